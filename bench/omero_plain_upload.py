"""Baseline for bench_omero.py: the plainest omero-py upload loop, no watchfolder code.

Run with the omero-py interpreter: ``python omero_plain_upload.py HOST PORT USER PASSWORD FILE BLOCK``.
Logs in, creates a dataset, imports FILE through the managed repository
(1 MiB writes, one SHA-1 pass while writing, verifyUpload, callback) and prints
``{"upload_seconds": s, "bytes": n, "total_seconds": t}``.
"""

import hashlib
import json
import os
import sys
import time

import omero
import omero.callbacks
import omero.clients  # noqa: F401
import omero.grid
import omero.model
from omero.model.enums import ChecksumAlgorithmSHA1160
from omero.rtypes import rbool, rstring


def main():
    host, port, user, password, path, block = sys.argv[1:7]
    block = int(block)
    start = time.monotonic()
    client = omero.client(host, int(port))
    client.createSession(user, password)
    try:
        update = client.getSession().getUpdateService()
        dataset = omero.model.DatasetI()
        dataset.setName(rstring("plain upload baseline"))
        dataset = update.saveAndReturnObject(dataset)
        repo = client.getManagedRepository()
        fileset = omero.model.FilesetI()
        entry = omero.model.FilesetEntryI()
        entry.setClientPath(rstring(os.path.abspath(path)))
        fileset.addFilesetEntry(entry)
        fileset.linkJob(omero.model.UploadJobI())
        settings = omero.grid.ImportSettings()
        settings.doThumbnails = rbool(True)
        settings.noStatsInfo = rbool(False)
        settings.checksumAlgorithm = omero.model.ChecksumAlgorithmI()
        settings.checksumAlgorithm.value = rstring(ChecksumAlgorithmSHA1160)
        settings.userSpecifiedTarget = omero.model.DatasetI(dataset.getId().getValue(), False)
        proc = repo.importFileset(fileset, settings)
        up_start = time.monotonic()
        rfs = proc.getUploader(0)
        digest = hashlib.sha1()
        offset = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(block)
                if not chunk:
                    break
                rfs.write(chunk, offset, len(chunk))
                digest.update(chunk)
                offset += len(chunk)
        rfs.close()
        upload_seconds = time.monotonic() - up_start
        handle = proc.verifyUpload([digest.hexdigest()])
        cb = omero.callbacks.CmdCallbackI(client, handle)
        cb.loop(600, 100)
        cb.close(True)
        proc.close()
    finally:
        client.closeSession()
    print(json.dumps({"upload_seconds": upload_seconds, "bytes": offset,
                      "total_seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()

"""Baseline for bench_omero.py and bench_omero_plate.py: the plainest omero-py upload loop, no watchfolder code.

Run with the omero-py interpreter: ``python omero_plain_upload.py HOST PORT USER PASSWORD PATH BLOCK``.
Logs in, creates a dataset, imports PATH through the managed repository and prints
``{"upload_seconds": s, "verified_seconds": v, "upload_cpu_seconds": c, "bytes": n, "files": f,
"total_seconds": t}``.
PATH is one file, or a folder whose files (every regular file below it, sorted by path)
form one fileset, as an HCS plate does. The files go one after another, each through
its own uploader (getUploader, 1 MiB writes with one SHA-1 pass while writing, close),
then one verifyUpload and the callback. ``upload_seconds`` ends with the last close,
``verified_seconds`` once verifyUpload has answered; ``upload_cpu_seconds`` is this
process's CPU time over the uploads.
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


def files_of(path):
    if not os.path.isdir(path):
        return [os.path.abspath(path)]
    found = []
    for folder, _, names in os.walk(path):
        found += [os.path.abspath(os.path.join(folder, n)) for n in names]
    return sorted(found)


def main():
    host, port, user, password, path, block = sys.argv[1:7]
    block = int(block)
    paths = files_of(path)
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
        for p in paths:
            entry = omero.model.FilesetEntryI()
            entry.setClientPath(rstring(p))
            fileset.addFilesetEntry(entry)
        fileset.linkJob(omero.model.UploadJobI())
        settings = omero.grid.ImportSettings()
        settings.doThumbnails = rbool(True)
        settings.noStatsInfo = rbool(False)
        settings.checksumAlgorithm = omero.model.ChecksumAlgorithmI()
        settings.checksumAlgorithm.value = rstring(ChecksumAlgorithmSHA1160)
        settings.userSpecifiedTarget = omero.model.DatasetI(dataset.getId().getValue(), False)
        proc = repo.importFileset(fileset, settings)
        up_start, cpu_start = time.monotonic(), time.process_time()
        hashes = []
        total = 0
        for i, p in enumerate(paths):
            rfs = proc.getUploader(i)
            digest = hashlib.sha1()
            offset = 0
            with open(p, "rb") as f:
                while True:
                    chunk = f.read(block)
                    if not chunk:
                        break
                    rfs.write(chunk, offset, len(chunk))
                    digest.update(chunk)
                    offset += len(chunk)
            if not offset:
                rfs.write(b"", 0, 0)  # OMERO creates the file on its first write
            rfs.close()
            hashes.append(digest.hexdigest())
            total += offset
        upload_seconds = time.monotonic() - up_start
        upload_cpu_seconds = time.process_time() - cpu_start
        handle = proc.verifyUpload(hashes)
        verified_seconds = time.monotonic() - up_start
        cb = omero.callbacks.CmdCallbackI(client, handle)
        cb.loop(600, 100)
        cb.close(True)
        proc.close()
    finally:
        client.closeSession()
    print(json.dumps({"upload_seconds": upload_seconds, "verified_seconds": verified_seconds,
                      "upload_cpu_seconds": upload_cpu_seconds, "bytes": total,
                      "files": len(paths), "total_seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()

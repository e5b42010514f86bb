"""The examples work: the client scripts against a real server, the deployment units' commands exist."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from watchfolder import cli
from watchfolder.service import Service
from watchfolder.web.auth import hash_token

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKEN = "wf_example-test-token"


@pytest.fixture
def service(tmp_path, make_config):
    drop = tmp_path / "drop"
    shutil.copytree(EXAMPLES / "acquisitions" / "slide3", drop / "slide3")
    config = make_config(
        server={"enabled": True, "listen": "127.0.0.1:0", "allowed_roots": [str(drop)],
                "tokens": [{"name": "portal", "role": "submit", "hash": hash_token(TOKEN)}]},
        workers={"count": 1, "poll_interval": 0.05},
    )
    svc = Service(config)
    svc.start()
    yield svc, drop
    svc.stop()


def _env(svc) -> dict[str, str]:
    return {**os.environ, "WATCHFOLDER_URL": svc.server.url, "WATCHFOLDER_TOKEN": TOKEN}


def test_submit_py_submits_and_waits_for_success(service):
    svc, drop = service
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "clients" / "submit.py"), str(drop / "slide3"), "--poll", "0.1",
         "--key", "slide3-2026-11-28"],
        env=_env(svc), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "job 1 queued" in result.stdout and "succeeded:" in result.stdout
    again = subprocess.run(
        [sys.executable, str(EXAMPLES / "clients" / "submit.py"), str(drop / "slide3"), "--poll", "0.1",
         "--key", "slide3-2026-11-28"],
        env=_env(svc), capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0 and "job 1 already known" in again.stdout


def test_submit_py_explains_a_refusal(service, tmp_path):
    svc, _ = service
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "clients" / "submit.py"), str(outside), "--owner", "jdoe", "--dataset", "d"],
        env=_env(svc), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "refused (403)" in result.stderr and "allowed roots" in result.stderr


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="submit.sh needs curl and jq")
def test_submit_sh_submits_and_waits_for_success(service):
    svc, drop = service
    result = subprocess.run(
        ["bash", str(EXAMPLES / "clients" / "submit.sh"), str(drop / "slide3"), "jdoe", "Brain atlas", "slide 3"],
        env=_env(svc), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout


def test_deployment_units_run_real_commands():
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = subparsers.choices
    units = sorted((EXAMPLES / "deploy").glob("*.service"))
    assert units
    for unit in units:
        for line in unit.read_text().splitlines():
            match = re.match(r"Exec(Start|StartPre)=(.*)", line)
            if not match:
                continue
            argv = shlex.split(match.group(2))
            assert Path(argv[0]).name == "watchfolder", line
            assert argv[1] in commands, f"{unit.name}: {argv[1]} is not a watchfolder command"
            # The options parse: run the command's parser on them.
            with pytest.raises(SystemExit) as done:
                parser.parse_args([*argv[1:], "--help"])
            assert done.value.code == 0

"""Runs the C++ reader, through the tensormap command line, over the conformance suite.

Valid files: `tensormap inspect --json` must equal the expected description and
`tensormap verify` must pass. Invalid files: `tensormap verify` must exit 1 and name the
expected error kind. Usage: check_cli.py PATH/TO/tensormap
"""
import json
import os
import subprocess
import sys


def main(argv):
    cli = argv[1]
    root = os.path.dirname(os.path.abspath(__file__))
    passed, failed = 0, 0

    def report(ok, what):
        nonlocal passed, failed
        passed += ok
        failed += not ok
        if not ok:
            print(f"FAIL {what}")

    valid = os.path.join(root, "valid")
    for name in sorted(f for f in os.listdir(valid) if f.endswith(".tmap")):
        path = os.path.join(valid, name)
        run = subprocess.run([cli, "inspect", "--json", path], capture_output=True, text=True)
        with open(path[:-5] + ".json", encoding="utf-8") as j:
            expected = json.load(j)
        got = json.loads(run.stdout) if run.returncode == 0 else None
        report(got == expected, f"valid/{name}: inspect --json (exit {run.returncode}) {run.stderr.strip()}")
        run = subprocess.run([cli, "verify", path], capture_output=True, text=True)
        report(run.returncode == 0, f"valid/{name}: verify exit {run.returncode}: {run.stderr.strip()}")

    invalid = os.path.join(root, "invalid")
    with open(os.path.join(invalid, "expected.json"), encoding="utf-8") as j:
        expected = json.load(j)
    for name, want in sorted(expected.items()):
        run = subprocess.run([cli, "verify", os.path.join(invalid, name)], capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        ok = run.returncode == 1 and lines and lines[0].startswith(f"tensormap: {want['kind']}: ")
        report(ok, f"invalid/{name}: exit {run.returncode}, stderr {run.stderr.strip()!r}, want {want['kind']}")
        if want["stage"] == "verify":  # open alone (inspect) must still accept it
            run = subprocess.run([cli, "inspect", os.path.join(invalid, name)], capture_output=True, text=True)
            report(run.returncode == 0, f"invalid/{name}: inspect should open it (exit {run.returncode})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Runs the Python reference reader over the whole conformance suite: every valid file
must read, verify and describe itself exactly as its .json says; every invalid file
must be rejected with its expected error kind at its expected stage."""
import json
import os
import sys

from tensormap_reader import TensormapError, TensormapFile


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        try:
            f = TensormapFile(path)
            f.verify()
            with open(path[:-5] + ".json", encoding="utf-8") as j:
                expected = json.load(j)
            ok = f.describe() == expected
            for t in f.tensors:  # every tensor is reachable as a zero-copy view
                view = f.array(t.name)
                ok = ok and view.nbytes == t.byte_length and view.base is not None
            report(ok, f"valid/{name}: description or views differ")
        except TensormapError as e:
            report(False, f"valid/{name}: rejected: {e}")

    invalid = os.path.join(root, "invalid")
    with open(os.path.join(invalid, "expected.json"), encoding="utf-8") as j:
        expected = json.load(j)
    for name, want in sorted(expected.items()):
        stage, kind = "open", None
        try:
            f = TensormapFile(os.path.join(invalid, name))
            stage = "verify"
            f.verify()
        except TensormapError as e:
            kind = e.kind
        report((stage, kind) == (want["stage"], want["kind"]),
               f"invalid/{name}: got {kind} at {stage}, want {want['kind']} at {want['stage']}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

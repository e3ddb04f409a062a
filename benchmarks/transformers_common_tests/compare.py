"""Compares two JUnit XML results of transformers' common tests (ours and a peer's), test by test.

    python compare.py results/ours.xml:MlaDsaModelTest results/peer.xml:DeepseekV32UnskippedTest

Prints the counts per class, then the tests that fail for ours and pass for the peer, fail for both, are skipped for
ours and pass for the peer, and pass for ours and fail for the peer.
"""

import collections
import sys
import xml.etree.ElementTree as ElementTree

OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}
BAD = ("failed", "error")


def load(path: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{test class: {test name: (outcome, first line of its message)}}."""
    results = collections.defaultdict(dict)
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in OUTCOMES:
                outcome = OUTCOMES[child.tag]
                message = (child.get("message") or "").strip().split("\n")[0][:300]
                break
        results[case.get("classname").split(".")[-1]][case.get("name")] = (outcome, message)
    return results


def results_of(spec: str) -> dict[str, tuple[str, str]]:
    path, test_class = spec.split(":")
    return load(path)[test_class]


def main() -> None:
    ours, peer = results_of(sys.argv[1]), results_of(sys.argv[2])
    for name, results in (("ours", ours), ("peer", peer)):
        print(name, dict(collections.Counter(outcome for outcome, _ in results.values())))
    rows = collections.defaultdict(list)
    for test in sorted(set(ours) | set(peer)):
        (mine, why), (theirs, _) = ours.get(test, ("absent", "")), peer.get(test, ("absent", ""))
        if mine in BAD and theirs == "passed":
            rows["fails for ours, passes for the peer"].append((test, why))
        elif mine in BAD and theirs in BAD:
            rows["fails for both"].append((test, why))
        elif mine == "skipped" and theirs == "passed":
            rows["skipped for ours, passes for the peer"].append((test, why))
        elif mine == "passed" and theirs in BAD:
            rows["passes for ours, fails for the peer"].append((test, peer[test][1]))
    for kind, found in rows.items():
        print(f"## {kind} ({len(found)})")
        for test, why in found:
            print(f"   {test} | {why}")


if __name__ == "__main__":
    main()

"""Check every published run record (`make check-records`; CI runs it).

A record passes when it parses, has status ok and every required key, lies at the path its scale, tag, task,
cell and seed name, its headline and final metrics are what its own per-item predictions give
(``reslora.lab.records.record_problems``, which states the tolerance), no other record is the same configuration,
it was made from a committed tree (git.dirty false), its identity config equals what its experiment composes
at HEAD (same experiment, scale, task, method, seed and overrides), and every asset it names (assets.sha256: Fig.
3's judges and base) has the sha256 that assets/SHA256SUMS commits (reslora.lab.assets); the committed asset files
must match SHA256SUMS too. Records of a task with assets made before assets were hashed name none: they are listed
as notes. Records known to fail a check are listed, with the reason, in results/records/known_stale.txt; they are
reported but do not fail the check. The check fails (exit 1) on any other problem, and on a listed record that no
longer has one (the list must stay true).

    python experiments/check_records.py [--results results] [--verbose]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reslora.lab.assets import committed_file_problems, names_no_hashes, record_asset_problems
from reslora.lab.records import (KNOWN_STALE, RecordError, differing_keys, duplicate_problems, identity, is_dirty,
                                 known_stale, read_record, record_problems, run_shape)

ROOT = Path(__file__).resolve().parents[1]
@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> dict:
    return identity(OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True))


def scale_option(record: dict) -> str:
    """The scale config the record was made with: recorded, or (older records) the scale name with the suffix
    of its task family's scales (cpu, cpu_nlg, cpu_t2i)."""
    chosen = (record.get("choices") or {}).get("scale")
    if chosen:
        return chosen
    family = record["config"]["task"].get("family")
    return record["scale"] + {"reasoning": "_nlg", "text2image": "_t2i"}.get(family, "")


def composed_identity(record: dict) -> dict:
    """The identity config that the record's experiment composes at HEAD (composed once per cell; the seed
    only sets the ``seed`` key, and the record's shape its processes and threads). The experiment is the recorded
    one (several share a tag: fig3 and fig3_base), else (older records) the one named as the tag."""
    tag = record["tag"]
    chosen = (record.get("choices") or {}).get("experiment") or tag
    experiment = (f"experiment={chosen}" if (ROOT / "conf" / "experiment" / f"{chosen}.yaml").is_file()
                  else f"tag={tag}")
    cell = _composed((experiment, f"scale={scale_option(record)}", f"task={record['task']}",
                      f"method={record['method']}", *record.get("variant_overrides", [])))
    return {**cell, "seed": record["seed"], **run_shape(record["config"])}


def check(results: Path, verbose: bool = False) -> int:
    records_dir = results / "records"
    known = known_stale(results)
    files = sorted(p for p in records_dir.glob("*/*/*/*/seed*.json") if p.parts[-5] != "smoke")
    problems: dict[str, str] = {}
    unhashed: list[str] = []  # records made before assets were hashed
    checked: dict[Path, dict] = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for path in files:
            name = str(path.relative_to(records_dir))
            try:
                record = read_record(path)
            except RecordError as error:
                problems[name] = str(error)
                continue
            issues = record_problems(record, path, records_dir)
            if issues:  # not a usable record: its config cannot be composed again either
                problems[name] = "; ".join(issues)
                continue
            checked[path] = record
            if is_dirty(record):
                issues.append(f"made from a tree with uncommitted changes (commit {record.get('git', {}).get('commit')})")
            differ = differing_keys(composed_identity(record), identity(record["config"]))
            if differ:
                issues.append(f"config differs from HEAD's in {len(differ)} key(s): {'; '.join(differ[:4])}"
                              + (" ..." if len(differ) > 4 else ""))
            issues += record_asset_problems(record)
            if names_no_hashes(record):
                unhashed.append(name)
            if issues:
                problems[name] = "; ".join(issues)
            elif verbose:
                print(f"ok      {name}")
    for path, problem in duplicate_problems(checked).items():
        name = str(path.relative_to(records_dir))
        problems[name] = "; ".join(filter(None, (problems.get(name), problem)))
    unlisted = {k: v for k, v in problems.items() if k not in known}
    listed = {k: v for k, v in problems.items() if k in known}
    fixed = sorted(k for k in known if k not in problems)
    for name, problem in listed.items():
        print(f"stale   {name}: {problem} (listed: {known[name]})")
    for name, problem in unlisted.items():
        print(f"FAIL    {name}: {problem}")
    for name in fixed:
        print(f"FAIL    {name} is listed in {KNOWN_STALE} but " +
              ("passes now: remove it from the list" if (records_dir / name).is_file() else "does not exist"))
    for name in unhashed:
        print(f"note    {name}: names no asset hashes (made before assets were hashed; rerun it on the committed "
              "assets)")
    assets = committed_file_problems()
    for problem in assets:
        print(f"FAIL    {problem}")
    print(f"{len(files)} records: {len(files) - len(problems)} pass, {len(listed)} listed as stale, "
          f"{len(unlisted)} unlisted problems, {len(fixed)} outdated list entries, {len(unhashed)} without asset "
          f"hashes; {len(assets)} committed asset files differing from assets/SHA256SUMS")
    return 1 if unlisted or fixed or assets else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--verbose", action="store_true", help="also list the records that pass")
    args = parser.parse_args()
    sys.exit(check(args.results, args.verbose))


if __name__ == "__main__":
    main()

"""Where matching time goes, and what the fixes bought (issue 8, item 4).

Times the phases of a shape-only match of SigLIP so400m/14-384 (a big_vision tree reversed from
known_mappings/siglip.yaml, target on the meta device) and of config inference, with cProfile's
top functions by own time. With ``--against REV`` the same script also runs in a temporary git
worktree of an older revision, in the same run, and prints the ratios.

    .venv/bin/python benchmarks/profile_hot_paths.py                     # this checkout
    .venv/bin/python benchmarks/profile_hot_paths.py --against a3b7300   # before the scale work
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "@@profile "


def _clear_solver_caches() -> None:
    """Empty every functools cache of the solver, so that each timing is a first run's."""
    import matcher.solve

    for name, module in list(sys.modules.items()):
        if name.startswith("matcher.solve"):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _clear_solver_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeat: int) -> dict:
    """In this process: phases of the so400m match, with the package found on sys.path."""
    from matcher.compat import install_torchvision_shim

    install_torchvision_shim()
    from matcher.config_infer import infer_config
    from matcher.solve import match_trees
    from matcher.targets import build_target, resolve_class
    from tests.matching import harness

    case = harness.siglip_case("so400m-patch14-384")
    config = harness.siglip_config("so400m-patch14-384")
    model_class = resolve_class("SiglipModel")
    match_trees(case.source, case.target)  # warm-up: imports, the synonym table
    result = {
        "build target": _best(lambda: build_target("SiglipModel", config), repeat),
        "match_trees": _best(lambda: match_trees(case.source, case.target), repeat),
        "infer config": _best(lambda: infer_config(model_class, case.source), 1),  # once: its probe builds are cached
    }
    _clear_solver_caches()
    profile = cProfile.Profile()
    profile.enable()
    match_trees(case.source, case.target)
    profile.disable()
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:6]
    result["top"] = [f"{Path(f).name}:{line} {name}: {tt:.3f} s own" for (f, line, name), (_, _, tt, _, _) in top]
    return result


def run_in(root: Path, repeat: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(root)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); " \
           f"import profile_hot_paths as p; print({MARK!r} + json.dumps(p.measure({repeat})))"
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise SystemExit(f"the measurement in {root} failed:\n{out.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="also measure this git revision (in a temporary worktree)")
    parser.add_argument("--repeat", type=int, default=5, help="best of N per phase (default 5)")
    args = parser.parse_args()
    rows = {"this checkout": run_in(ROOT, args.repeat)}
    if args.against:
        with tempfile.TemporaryDirectory(prefix="matcher-profile-") as tmp:
            worktree = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(worktree), args.against], check=True, capture_output=True)
            try:
                rows[args.against] = run_in(worktree, args.repeat)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    phases = ["build target", "match_trees", "infer config"]
    print(f"SigLIP so400m/14-384, shape-only, best of {args.repeat} (infer config: its first call, as a user's run makes it)\n")
    print("| revision | " + " | ".join(phases) + " |")
    print("|---|" + "---:|" * len(phases))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.3f} s" for p in phases) + " |")
    if args.against:
        old, new = rows[args.against], rows["this checkout"]
        print("| ratio (old / new) | " + " | ".join(f"{old[p] / new[p]:.1f}x" for p in phases) + " |")
    for name, row in rows.items():
        print(f"\ncProfile of match_trees ({name}), top functions by own time:")
        for line in row["top"]:
            print(f"- {line}")


if __name__ == "__main__":
    main()

"""The default recipe at a short budget: sample quality of ``python src/train.py`` after a few thousand steps, and
what moves it (EMA length, learning rate, dropout, parametrization, schedule). Results go to
``benchmarks/short_run/<name>.{json,md}``.

Or at equal CPU time, with the exact test bound (issue 33: levers of the VDM preset at 15 CPU-minutes):

    python benchmarks/short_run.py --name vdm_15cpu --cpu-minutes 15 --steps 100000 --test-bound --jobs 1 \
        --variant vdm=experiment=digits_vdm --variant augment=experiment=digits_vdm,augment=geometric

    python benchmarks/short_run.py --name default_3k --steps 3000 --jobs 2 \\
        --variant default= --variant lr1e-3=optimizer.lr=1e-3 --variant ema0.995=callbacks.ema.decay=0.995,callbacks.ema.sigma_rel=null

On a machine that cannot be kept free for the whole table (``--jobs 1`` and nothing else for every run), measure each
variant's cost alone once, then train every variant for its share of the budget in steps, on a busy machine if need be:

    python benchmarks/short_run.py --name vdm_15cpu --calibrate 200 --variant vdm=experiment=digits_vdm ...
    python benchmarks/short_run.py --name vdm_15cpu --cpu-minutes 15 --calibrated --test-bound --variant vdm=...

Calibrations drift between days; ``--anchor LABEL`` with ``--calibrate`` measures LABEL (calibrated before) again first
and scales the sitting's costs by its earlier cost over today's, so variants calibrated on different days share one
scale (the entry keeps ``measured_cpu_seconds_per_step`` and the anchor's two costs):

    python benchmarks/short_run.py --name vdm_15cpu --calibrate 150 --anchor narrow --variant depth1=...

A variant whose training step is another's computation (only optimizer or learning-rate settings differ) trains that
one's steps with ``--same-cost LABEL=OTHER``: two calibrations of one computation hours apart differed by 10% (1.114
and 1.004 CPU-s per step), more than such a variant's real difference. ``--test-fid`` adds issue 33's sample target: the
FID against the test split of as many samples as the train split has, beside the floor (the train split against it).

``--calibrate N`` trains each variant N steps on one thread, alone (it refuses to start a variant while the CPUs are more
than 20% busy), and keeps its CPU-seconds per training step in ``<name>/calibration.json``; ``--calibrated`` then trains
each variant round(60 budget / cost) steps and reports those steps' CPU-minutes at that cost, the machine's own
(CPU time of a busy machine's runs inflates: two runs on the 2 vCPUs each take ~1.8x the CPU time per step).

Each variant is ``label=override,override,...`` (empty: the default as a user runs it). Every (variant, seed) trains
with ``src/train.py`` in its own process (``--jobs`` at a time, ``OMP_NUM_THREADS=cores/jobs`` each, so runs in one
table get the same CPU share), then the classifier FID of its last checkpoint (EMA weights) is computed with ``src/eval.py``'s functions:
2000 DDIM-50 samples against the train split, as in ``benchmarks/vdm/fid.md``, once for each sampling seed
(``--fid-seeds``; one 2000-sample FID of a digits model varies by about 0.4 between sampling seeds,
``benchmarks/SAMPLING.md``). The last validation bound
(``val/elbo_bpd``, the 180 val digits) is read from the run's CSV log. A trained run whose eval is missing is evaluated, not retrained; a finished (variant, seed) is kept in
``<out>/<name>/runs.json`` and not rerun while its command is unchanged.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "short_run"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line  # noqa: E402

WARM = """
import os
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from diffusion_elbo.fid import make_fid
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg = compose("train", overrides=["logger=none"])
dm = instantiate(cfg.data)
dm.setup("fit")
make_fid(dm, cache_dir=cfg.paths.cache_dir)
"""


def checkpoint_fids(ckpt: str, seeds: list[int], num_samples: int = 2000) -> list[float]:
    """Classifier FID of ``num_samples`` DDIM-50 samples of the checkpoint (its EMA weights) against the train split,
    once per sampling seed (other x_T and noise), with the functions ``src/eval.py`` uses."""
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import compute_fid, make_fid

    loaded = load_for_eval(ckpt)
    loaded.datamodule.setup("fit")
    fid = make_fid(loaded.datamodule, cache_dir=ROOT / "data" / "cache")
    return [
        compute_fid(
            loaded.module,
            fid,
            num_samples=num_samples,
            rank=0,
            world_size=1,
            sampler=DDIMSampler(steps=50),
            batch_size=256,
            seed=s,
        )
        for s in seeds
    ]


def checkpoint_test_fid(ckpt: str, seed: int) -> dict:
    """Issue 33's sample-quality target: the classifier FID of as many DDIM-50 samples of the checkpoint (EMA weights)
    as the train split has, against the test split, beside the real-data floor, the train split itself against the
    test split (the same set sizes, so the same small-sample bias)."""
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import compute_fid, make_fid, split_fid

    loaded = load_for_eval(ckpt)
    dm = loaded.datamodule
    dm.setup("fit")
    dm.setup("test")
    fid = make_fid(dm, cache_dir=ROOT / "data" / "cache", reference_split="test")
    n = len(dm.split("train"))
    model = compute_fid(
        loaded.module, fid, num_samples=n, rank=0, world_size=1, sampler=DDIMSampler(steps=50), batch_size=256,
        seed=seed,
    )  # fmt: skip
    return {"fid_test": model, "fid_floor": split_fid(fid, dm, "train"), "fid_test_samples": n, "fid_test_seed": seed}


def _last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in the run's CSV log."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    value = None
    if files:
        with files[-1].open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    value = float(row[key])
    return value


def test_bound(ckpt: Path, env: dict, num_examples: int | None) -> dict:
    """The exact T-step bound of the checkpoint on the test split (``src/eval.py``, no FID), with a continuous-time
    model's own bound beside it."""
    out = ckpt.parent.parent / "eval" / "short_run-test"
    command = [sys.executable, "src/eval.py", f"ckpt_path={ckpt}", "split=test", "fid.num_samples=0",
               "wandb.enabled=false", f"hydra.run.dir={out}"]  # fmt: skip
    if num_examples is not None:
        command.append(f"num_examples={num_examples}")
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = json.loads((out / "metrics.json").read_text())
    row = {
        "test_elbo_bpd": metrics["bpd"],
        "test_elbo_bpd_se": metrics["bpd_se"],
        "test_examples": metrics["num_examples"],
        "test_examples_asked": num_examples,  # None: the whole split
    }
    if "continuous" in metrics:
        row["test_own_bound_bpd"] = metrics["continuous"]["bpd"]
    return row


def _job(
    label: str,
    overrides: list[str],
    seed: int,
    steps: int,
    runs_dir: Path,
    threads: int,
    fid_seeds: list[int],
    known: dict[int, float] | None = None,
    cpu_minutes: float | None = None,
    test_examples: int | None = 0,
    fid_samples: int = 2000,
    earlier: dict | None = None,
    test_fid: bool = False,
) -> dict:
    # a run to a CPU budget has its own folder: another budget is another run, never a longer or shorter one reused
    run_dir = runs_dir / (f"{label}-s{seed}" + ("" if cpu_minutes is None else f"-cpu{cpu_minutes:g}"))
    budget = [] if cpu_minutes is None else [f"callbacks.cpu_budget.minutes={cpu_minutes}"]
    train = [
        sys.executable,
        "src/train.py",
        *overrides,
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        *budget,
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():  # (a calibrated run's folder is named by label and seed only)
        trained_for = yaml.safe_load(config.read_text())["trainer"]["max_steps"]
        if trained_for != steps:
            raise SystemExit(
                f"{run_dir} is a run of {trained_for} steps, this table asks {steps} (another budget or calibration): "
                "move that folder away or pass another --runs-dir"
            )
    finished = run_dir / "train_metrics.json"
    spent = _last_logged(run_dir, "train/cpu_minutes") if finished.is_file() else None
    if finished.is_file() and (
        json.loads(finished.read_text()).get("global_step") == steps
        or (cpu_minutes is not None and spent is not None and spent >= cpu_minutes)
    ):
        # trained by an earlier invocation: keep it, with that invocation's timing or else one from its files
        train_s = (earlier or {}).get("train_minutes", 0) * 60 or finished.stat().st_mtime - config.stat().st_mtime
    else:
        known, earlier = {}, None  # numbers of an earlier checkpoint are not this one's
        if (run_dir / "checkpoints" / "last.ckpt").is_file():  # an interrupted invocation's run: resume it
            train.insert(-1, "ckpt_path=last")  # (before hydra.run.dir, which the recorded command leaves out)
        start = time.perf_counter()
        subprocess.run(train, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        train_s = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    have = dict(known or {})  # sampling seed -> FID, of an earlier invocation on this same checkpoint
    missing = [s for s in fid_seeds if s not in have]
    if missing:
        fid = [sys.executable, str(Path(__file__).resolve()), "--fid", str(ckpt), "--fid-seeds", *map(str, missing),
               "--fid-samples", str(fid_samples)]  # fmt: skip
        done = subprocess.run(fid, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        have.update(zip(missing, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))
    fids = [have[s] for s in fid_seeds]
    row = {
        "label": label,
        "seed": seed,
        "steps": steps,
        "cpu_budget_minutes": cpu_minutes,
        "steps_trained": json.loads(finished.read_text()).get("global_step"),
        "cpu_minutes": _last_logged(run_dir, "train/cpu_minutes"),
        "overrides": overrides,
        "command": "python src/train.py " + " ".join(a for a in train[2:-1] if a != "ckpt_path=last"),
        "train_minutes": train_s / 60,
        "threads": threads,
        "fid": mean(fids),
        "fids": fids,
        "fid_seeds": list(fid_seeds),
        "val_elbo_bpd": _last_logged(run_dir, "val/elbo_bpd"),
    }
    earlier = earlier or {}  # this checkpoint's numbers from an earlier invocation: kept, not recomputed
    if test_examples != 0:  # 0: no test bound; None: the whole split
        keys = ("test_elbo_bpd", "test_elbo_bpd_se", "test_examples", "test_examples_asked", "test_own_bound_bpd")
        row.update({k: earlier[k] for k in keys if k in earlier} if _has_test_bound(earlier, test_examples) else
                   test_bound(ckpt, env, test_examples))  # fmt: skip
    if test_fid:
        if _has_test_fid(earlier, fid_seeds):
            row.update({k: earlier[k] for k in ("fid_test", "fid_floor", "fid_test_samples", "fid_test_seed")})
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--fid-test-of", str(ckpt), "--fid-seeds",
                   str(fid_seeds[0])]  # fmt: skip
            done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def _has_test_bound(row: dict, test_examples: int | None) -> bool:
    """Whether ``row`` holds the test bound on that many examples (None: the whole split, as ``src/eval.py`` ran it)."""
    if "test_elbo_bpd" not in row:
        return False
    return row.get("test_examples_asked") == test_examples  # (rows from before the key: the whole split)


def _has_test_fid(row: dict, fid_seeds: list[int]) -> bool:
    return "fid_test" in row and row.get("fid_test_seed") == fid_seeds[0]


def _test_fid(row: dict) -> str:
    return f"{row['fid_test']:.3f} ({row['fid_floor']:.3f})" if "fid_test" in row else "-"


def _record(path: Path, row: dict) -> list[dict]:
    """Add ``row`` to runs.json (replacing its variant and seed's), read again under a lock: another invocation on the
    same table (the other core's variants) may have added rows since this one started. Returns the rows."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = json.loads(path.read_text()) if path.is_file() else []
        kept = [r for r in kept if not (r["label"] == row["label"] and r["seed"] == row["seed"])] + [row]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        tmp.replace(path)
    return kept


def _busy_fraction(seconds: float = 3.0) -> float:
    """The fraction of all CPUs' time spent busy over ``seconds`` (from /proc/stat; the load average lags by minutes)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def anchored(entry: dict, anchor: str, table_cost: float, same_sitting: float) -> dict:
    """``entry`` (a calibration) put on the scale of the table's earlier calibrations: its measured cost times the
    anchor variant's table cost over the anchor's cost measured in the same sitting. Two calibrations of one
    computation on different days differed by up to 10%, more than the variants being compared; the ratio of two
    costs measured in one sitting is what carries over."""
    measured = entry.get("measured_cpu_seconds_per_step", entry["cpu_seconds_per_step"])
    return {
        **entry,
        "measured_cpu_seconds_per_step": measured,
        "anchor": {"label": anchor, "table_cpu_seconds_per_step": table_cost, "same_sitting": same_sitting},
        "cpu_seconds_per_step": measured * table_cost / same_sitting,
    }


def calibrate(variants: list[tuple[str, list[str]]], steps: int, runs_dir: Path, path: Path,
              anchor: str | None = None) -> None:  # fmt: skip
    """Each variant's CPU-seconds per training step: ``steps`` steps on one thread with the machine otherwise idle
    (refused while the CPUs are more than 20% busy), read from the run's own ``train/cpu_minutes``. With ``anchor``
    (a variant calibrated before), that variant is measured again first and every cost of this sitting is scaled
    by its earlier cost over today's (:func:`anchored`)."""
    costs = json.loads(path.read_text()) if path.is_file() else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if anchor is not None:
        if anchor not in costs:
            raise SystemExit(f"--anchor {anchor}: it has no earlier calibration in {path}")
        variants = [(f"{anchor}@anchor", costs[anchor]["overrides"]), *variants]
    for label, overrides in variants:
        load = _busy_fraction()
        if load > 0.2:
            raise SystemExit(f"the CPUs are {100 * load:.0f}% busy: calibrate with nothing else running")
        run_dir = runs_dir / f"calibrate-{label}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a scratch run: always from step 0
        cmd = [sys.executable, "src/train.py", *overrides, f"trainer.max_steps={steps}", "logger=csv",
               "trainer.enable_progress_bar=false", f"trainer.val_check_interval={steps}", "callbacks.fid.num_samples=0",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        minutes = _last_logged(run_dir, "train/cpu_minutes")
        costs[label] = {
            "overrides": overrides,
            "steps": steps,
            "cpu_seconds_per_step": 60 * minutes / steps,
            "busy_fraction_before": load,
            "machine": machine(),
        }
        if anchor is not None and label != f"{anchor}@anchor":
            same_sitting = costs[f"{anchor}@anchor"]["cpu_seconds_per_step"]
            costs[label] = anchored(costs[label], anchor, costs[anchor]["cpu_seconds_per_step"], same_sitting)
        path.write_text(json.dumps(costs, indent=1) + "\n")
        print(f"{label}: {costs[label]['cpu_seconds_per_step']:.3f} CPU-s per step", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name")
    p.add_argument("--variant", action="append", default=[], help="label=override,override,... (may be empty)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir", default="outputs/short_run", help="where the training runs go (not committed)")
    p.add_argument("--caption", default="")
    p.add_argument(
        "--fid-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="sampling seeds of the FID (each its own x_T per sample; the FID's mean over seeds and its spread)",
    )
    p.add_argument(
        "--cpu-minutes",
        type=float,
        help="train each run for this many CPU-minutes of training steps (callbacks.cpu_budget; --steps is then a cap)",
    )
    p.add_argument(
        "--test-bound",
        action="store_true",
        help="also the exact T-step bound of each run's last checkpoint on the whole test split (src/eval.py)",
    )
    p.add_argument(
        "--calibrate",
        type=int,
        metavar="STEPS",
        help="measure each variant's CPU-seconds per training step alone (STEPS steps, one thread) and stop",
    )
    p.add_argument(
        "--anchor",
        metavar="LABEL",
        help="with --calibrate: measure this already calibrated variant again first and scale the sitting's costs by "
        "its earlier cost over today's (calibrations drift by up to 10%% between days; ratios within a sitting hold)",
    )
    p.add_argument(
        "--calibrated",
        action="store_true",
        help="with --cpu-minutes: train each variant the steps its calibrated cost buys (no budget callback)",
    )
    p.add_argument(
        "--test-fid",
        action="store_true",
        help="also the FID against the test split of as many samples as the train split has (first sampling seed), "
        "beside the real-data floor (the train split against the test split)",
    )
    p.add_argument(
        "--same-cost",
        action="append",
        default=[],
        metavar="LABEL=OTHER",
        help="with --calibrated: LABEL's training step is OTHER's computation (only optimizer or learning-rate "
        "settings differ), so it trains OTHER's steps; its own calibration then measures the calibration's noise",
    )
    p.add_argument("--test-examples", type=int, help=argparse.SUPPRESS)  # a smoke test's first N test examples
    p.add_argument("--fid-samples", type=int, default=2000, help=argparse.SUPPRESS)  # a smoke test's few samples
    p.add_argument("--fid", help=argparse.SUPPRESS)  # internal: print the FIDs of this checkpoint as JSON
    p.add_argument("--fid-test-of", help=argparse.SUPPRESS)  # internal: print its FID against the test split as JSON
    args = p.parse_args()
    if args.fid:
        print(json.dumps(checkpoint_fids(args.fid, args.fid_seeds, args.fid_samples)))
        return
    if args.fid_test_of:
        print(json.dumps(checkpoint_test_fid(args.fid_test_of, args.fid_seeds[0])))
        return
    if not args.name or not args.variant:
        p.error("--name and at least one --variant are required")

    out = OUT / args.name
    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / "runs.json"
    kept = json.loads(kept_path.read_text()) if kept_path.is_file() else []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs_dir = (ROOT / args.runs_dir / args.name).resolve()

    variants = []
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        variants.append((label, [o for o in rest.split(",") if o]))
    calibration_path = out / "calibration.json"
    if args.calibrate:
        calibrate(variants, args.calibrate, runs_dir, calibration_path, args.anchor)
        return
    calibration = json.loads(calibration_path.read_text()) if calibration_path.is_file() else {}
    steps_of = {label: args.steps for label, _ in variants}  # each variant's step count (a cap under a CPU budget)
    budget = args.cpu_minutes
    same = {}
    labels = {label: overrides for label, overrides in variants}
    # OTHER need not be trained in this invocation: its calibration names its overrides
    calibrated_overrides = {k: c["overrides"] for k, c in calibration.items()}
    for spec in args.same_cost:
        label, eq, other = spec.partition("=")
        if other not in labels and other in calibrated_overrides:
            labels[other] = calibrated_overrides[other]
        if not eq or label not in labels or other not in labels:
            p.error(f"--same-cost {spec}: give LABEL=OTHER, a variant of this table and a variant of it or of its "
                    f"calibration ({', '.join(labels)})")  # fmt: skip
        if not set(labels[other]) <= set(labels[label]):
            p.error(f"--same-cost {spec}: {label} must be {other}'s overrides plus optimizer settings")
        same[label] = other
    if same and not args.calibrated:
        p.error("--same-cost needs --calibrated (it sets a variant's steps from another's calibrated cost)")
    if args.calibrated:
        if args.cpu_minutes is None:
            p.error("--calibrated needs --cpu-minutes")
        for label, overrides in variants:
            if calibration.get(label, {}).get("overrides") != overrides:  # (before the val interval is added below)
                p.error(f"variant {label} has no calibration with these overrides: run --calibrate first")
            if same.get(label, label) not in calibration:
                p.error(f"--same-cost {label}={same[label]}: {same[label]} has no calibration")
            steps_of[label] = round(60 * args.cpu_minutes / calibration[same.get(label, label)]["cpu_seconds_per_step"])
        budget = None  # the steps carry the budget; the run's own CPU time is not the machine's alone
        # the val bound at the last step (the one the variants are chosen on)
        variants = [(label, [*o, f"trainer.val_check_interval={steps_of[label]}"]) for label, o in variants]

    # the FID classifier and reference statistics are trained once, before the jobs race for them
    subprocess.run([sys.executable, "-c", WARM], cwd=ROOT, check=True)

    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for label, overrides in variants:
        for seed in args.seeds:
            done = [r for r in kept if r["label"] == label and r["seed"] == seed and r["steps"] == steps_of[label]
                    and r.get("cpu_budget_minutes") == budget]  # fmt: skip
            test_examples = args.test_examples or None
            complete = (not args.test_bound or (done and _has_test_bound(done[0], test_examples))) and (
                not args.test_fid or (done and _has_test_fid(done[0], args.fid_seeds))
            )
            if done and done[0]["overrides"] == overrides and done[0].get("fid_seeds") == args.fid_seeds and complete:
                continue
            known, earlier = {}, None
            if done and done[0]["overrides"] == overrides:  # trained, some numbers missing
                known = dict(zip(done[0].get("fid_seeds", [0]), done[0].get("fids", [done[0]["fid"]]), strict=True))
                earlier = done[0]
            todo.append((label, overrides, seed, known, earlier))
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(
                _job,
                label,
                overrides,
                seed,
                steps_of[label],
                runs_dir,
                threads,
                args.fid_seeds,
                known,
                budget,
                (args.test_examples or None) if args.test_bound else 0,
                args.fid_samples,
                earlier,
                args.test_fid,
            )
            for label, overrides, seed, known, earlier in todo
        ]
        for f in futures:
            row = f.result()
            if args.calibrated:  # the CPU time these steps take on the machine alone, at the calibrated cost
                costed = same.get(row["label"], row["label"])
                cost = calibration[costed]["cpu_seconds_per_step"]
                row["cost_of"] = costed
                row["cpu_minutes_alone"] = row["steps_trained"] * cost / 60
            kept = _record(kept_path, row)
            print(f"{row['label']} seed {row['seed']}: FID {row['fid']:.3f}, val {row['val_elbo_bpd']}", flush=True)

    order = [label for label, _ in variants]
    rows = sorted((r for r in kept if r["label"] in order), key=lambda r: (order.index(r["label"]), r["seed"]))
    lines = [
        f"| variant | overrides | training seeds | steps | CPU-minutes | FID ({args.fid_samples} samples, DDIM 50) | "
        "FID per training seed | val -ELBO (bits/dim) | test -ELBO (bits/dim) | wall minutes |"
        + (" FID against the test split (floor) |" if args.test_fid else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.test_fid else ""),
    ]
    for label, overrides in variants:
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        draws = [v for r in mine for v in r.get("fids", [r["fid"]])]
        fid = f"{mean(draws):.3f}" + (f" ± {stdev(draws):.3f}" if len(draws) > 1 else "")
        per_seed = ", ".join(f"{r['seed']}: {r['fid']:.3f}" for r in mine)
        vals = [r["val_elbo_bpd"] for r in mine if r["val_elbo_bpd"] is not None]
        tests = [(r["test_elbo_bpd"], r["test_elbo_bpd_se"]) for r in mine if "test_elbo_bpd" in r]
        test = "-" if not tests else ", ".join(f"{b:.3f} ± {se:.3f}" for b, se in tests)
        steps = ", ".join(str(r.get("steps_trained", r["steps"])) for r in mine)
        cpu = ", ".join(
            "-" if r.get("cpu_minutes") is None else f"{r.get('cpu_minutes_alone', r['cpu_minutes']):.1f}" for r in mine
        )
        lines.append(
            f"| {label} | `{' '.join(overrides) or '(none)'}` | {len(mine)} | {steps} | {cpu} | {fid} | {per_seed} | "
            f"{f'{mean(vals):.3f}' if vals else '-'} | {test} | {mean(r['train_minutes'] for r in mine):.1f} |"
            + (f" {', '.join(_test_fid(r) for r in mine)} |" if args.test_fid else "")
        )
    m = machine()
    (out / "table.json").write_text(
        json.dumps({"machine": m, "steps": args.steps, "cpu_minutes": args.cpu_minutes, "rows": rows}, indent=1) + "\n"
    )
    length = (
        f"{args.steps} training steps"
        if args.cpu_minutes is None
        else f"{args.cpu_minutes:g} CPU-minutes of training steps each (callbacks.cpu_budget; at most {args.steps} steps)"
    )
    if args.calibrated:
        length = (
            f"{args.cpu_minutes:g} CPU-minutes of training steps each, as steps at each variant's cost measured alone "
            f"on one thread ({calibration_path.name}); CPU-minutes: those steps at that cost"
        )
        if same:
            length += (
                " (" + ", ".join(f"{k} at {v}'s" for k, v in same.items()) + ": the same computation per step, only "
                "optimizer settings differ; their own calibrations measure its noise)"
            )
    caption = (
        f"{length}, each run on {threads} thread(s) with {args.jobs} at a time. wall minutes: the training job's "
        "wall time (the whole `src/train.py` job, validation included), which other work on the machine lengthens. "
        "FID: classifier features, 2000 DDIM-50 samples of the EMA weights against the train split (lower is "
        f"better), computed for the sampling seeds {args.fid_seeds} of each run; mean ± std over all (training "
        "seed, sampling seed) draws. val -ELBO: the 180 val digits at the last step. test -ELBO: the exact T-step "
        "bound of the last checkpoint on the test split (± its standard error over examples). "
        + (
            "FID against the test split: as many DDIM-50 samples as the train split has (sampling seed "
            f"{args.fid_seeds[0]}) against the test split, and in brackets the real-data floor, the train split "
            "itself against the test split (issue 33's target: at most the floor). "
            if args.test_fid
            else ""
        )
        + args.caption
    )
    (out / "table.md").write_text("\n".join([f"# {args.name}", "", f"{machine_line(m)} {caption}", "", *lines]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

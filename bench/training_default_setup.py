"""Issue 7's done-when on the default setup, end to end: the browser, then the command line.

A fresh data folder; the studio started the way the README says (`python app.py` with
STUDIO_DATA_DIR and STUDIO_PORT, the default models from the model cache: MiniLM for the reward
model, SmolLM2-135M-Instruct for the policy); the first admin made through the one-time setup link
the console prints. Then headless Chromium (Playwright) drives the studio like a user:

1. a project; a small preference file (synthetic task, `python -m trainers.synthetic`) imported on
   the Datasets tab;
2. Training tab: a reward-model job on the default encoder (snapshot made with the tab's button),
   watched to 100 %;
3. a DPO job on SmolLM2 (tiny settings, a checkpoint every step), cancelled once its first checkpoint
   is complete on disk, resumed (a new job from that checkpoint), watched to 100 %;
4. the registry: both checkpoints listed with their lineage, Verify on each.

Then the same two jobs headless, with the studio stopped: `python -m trainers reward_model --config`,
`studio train dpo --config`, and both again queued through the job service and run by `studio worker`.

Writes `bench/results/training_default_setup.json`: per job the states, wall time, median step time,
first-checkpoint time; checkpoint ids / kinds / parents; problems seen. Not a test: it takes minutes
on a CPU, needs the default models (`studio fetch-models`) and /usr/bin/chromium.

    .venv/bin/python bench/training_default_setup.py [--pairs 40] [--rm-steps 30] [--dpo-steps 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "training_default_setup.json"
STUDIO_BIN = str(Path(sys.executable).with_name("studio"))

from bench.harness.studio_session import ADMIN, CHROMIUM, JOB_MS, CpuMeter, Studio, Ui, wait_for  # noqa: E402

# ----------------------------------------------------------------------------- small pure helpers


def step_times(metrics_path: Path) -> list[float]:
    """Seconds between consecutive training rows (`train/loss`) of a metrics.jsonl within one attempt
    (each attempt starts with its `run/total_steps` row, so a resume's restart gap is left out)."""
    times: list[float] = []
    last: tuple[int, float] | None = None
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line)
            if "run/total_steps" in row:
                last = None
            elif "train/loss" in row:
                step, at = int(row["step"]), float(row["time"])
                if last is not None and step == last[0] + 1:
                    times.append(at - last[1])
                last = (step, at)
    return times


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def seconds_between(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 2)


# ----------------------------------------------------------------------------- the studio process


def database(data_dir: Path):
    from storage.db import Database
    from studio.settings import Settings

    return Database.from_url(Settings(data_dir=data_dir).database_url)


def job_facts(data_dir: Path, job_id: int) -> dict[str, Any]:
    """One job's row as plain JSON, with its wall time and median step time (from metrics.jsonl)."""
    from storage.models import Job

    db = database(data_dir)
    try:
        with db.read() as s:
            job = s.get(Job, job_id)
            row = {
                "id": job.id, "recipe": job.recipe, "name": job.name, "state": str(job.state),
                "failure_code": str(job.failure_code) if job.failure_code else None,
                "failure_message": job.failure_message, "step": job.step, "total_steps": job.total_steps,
                "attempt": job.attempt, "parent_job_id": job.parent_job_id, "exit_code": job.exit_code,
                "output_checkpoint_id": job.output_checkpoint_id, "base_checkpoint_id": job.base_checkpoint_id,
                "snapshot_id": job.snapshot_id, "output_dir": job.output_dir,
                "wall_s": seconds_between(job.started_at, job.finished_at),
            }  # fmt: skip
    finally:
        db.dispose()
    row["median_step_s"] = median(step_times(Path(row["output_dir"]) / "metrics.jsonl"))
    return row


def registry(data_dir: Path) -> list[dict[str, Any]]:
    from sqlmodel import select

    from storage.models import Checkpoint, DatasetSnapshot, Job

    db = database(data_dir)
    try:
        with db.read() as s:
            jobs = {j.output_checkpoint_id: j.id for j in s.exec(select(Job)).all() if j.output_checkpoint_id}
            shas = {d.id: d.sha256 for d in s.exec(select(DatasetSnapshot)).all()}
            return [
                {
                    "id": c.id,
                    "name": c.name,
                    "kind": str(c.kind),
                    "status": str(c.status),
                    "recipe": c.recipe,
                    "parent_id": c.parent_id,
                    "job_id": jobs.get(c.id),
                    "snapshot_id": c.snapshot_id,
                    "snapshot_sha256": shas.get(c.snapshot_id),
                    "path": c.path,
                    "metrics": c.metrics,
                }
                for c in s.exec(select(Checkpoint).order_by(Checkpoint.id)).all()
            ]
    finally:
        db.dispose()


# ----------------------------------------------------------------------------- the browser


def browser_part(studio: Studio, pairs_file: Path, args, out: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    rm_fields = {"max_steps": args.rm_steps}
    dpo_fields = {
        "max_steps": args.dpo_steps, "batch_size": 1, "max_length": args.dpo_max_length,
        "checkpoint_every": 1, "eval_batch_size": 4,
    }  # fmt: skip
    out["forms"] = {"reward_model": rm_fields, "dpo": dpo_fields}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.set_default_timeout(60_000)
        ui = Ui(page, studio)
        meter = CpuMeter(studio.proc.pid)
        t0 = time.perf_counter()
        ui.first_admin()
        ui.project_with_pairs(pairs_file, args.pairs)
        ui.tab("Training")
        out["setup_to_training_tab_s"] = round(time.perf_counter() - t0, 2)

        # 1. Reward model on the recipe's default encoder (MiniLM).
        rm: dict[str, Any] = {"snapshot": ui.prepare("reward_model", "minilm", rm_fields, "rm default")}
        t, cpu0 = time.perf_counter(), meter.sample()
        rm["job_id"] = ui.launch()
        rm["ui_first_running_step_s"] = ui.wait_progress(r"running · \d+ % · step [1-9]")
        ui.wait_progress(rf"succeeded · 100 % · step {args.rm_steps} / {args.rm_steps}")
        rm["ui_succeeded_s"] = round(time.perf_counter() - t, 2)
        rm["watching_cpu"] = CpuMeter.delta(cpu0, meter.sample())
        rm["result_line"] = ui.text("train-result").strip()
        rm["job"] = job_facts(studio.data_dir, rm["job_id"])
        out["rm"] = rm

        # 2. DPO on SmolLM2: cancel after the first complete checkpoint, resume, watch to 100 %.
        dpo: dict[str, Any] = {
            "snapshot": ui.prepare("dpo", "SmolLM2-135M-Instruct (base)", dpo_fields, "dpo default")
        }
        t, cpu0 = time.perf_counter(), meter.sample()
        dpo["job_id"] = ui.launch()
        folder = Path(job_facts(studio.data_dir, dpo["job_id"])["output_dir"])
        dpo["first_checkpoint_s"] = wait_for(
            lambda: any((folder / "checkpoints").glob("step-*/COMPLETE")), 1800, "a complete step checkpoint"
        )
        dpo["first_checkpoint"] = sorted(
            c.parent.name for c in (folder / "checkpoints").glob("step-*/COMPLETE")
        )
        dpo["launch_to_first_checkpoint_s"] = round(time.perf_counter() - t, 2)
        cancel_at = time.perf_counter()
        page.locator("#train-cancel").click()
        ui.expect(page.locator("#train-action-status")).to_contain_text(
            re.compile(r"Cancel requested|cancelled")
        )
        ui.expect(page.locator("#train-job-state")).to_contain_text(
            re.compile(r"· (cancelled|succeeded)"), timeout=JOB_MS
        )
        dpo["cancel_click_to_cancelled_s"] = round(time.perf_counter() - cancel_at, 2)
        dpo["cancelled_job"] = job_facts(studio.data_dir, dpo["job_id"])
        if dpo["cancelled_job"]["exit_code"] == -signal.SIGKILL:
            out["notes"].append(
                "the cancelled DPO trainer was SIGKILLed after the worker's grace period (30 s): "
                "one step plus its checkpoint took longer than that"
            )
        if dpo["cancelled_job"]["state"] != "cancelled":
            out["problems"].append(
                f"the DPO job ended {dpo['cancelled_job']['state']} before the cancel landed"
            )
        else:
            page.locator("#train-resume").click()
            status = page.locator("#train-action-status")
            ui.expect(status).to_contain_text("Resumed job", timeout=120_000)
            dpo["resumed_job_id"] = int(re.search(r"as job #(\d+)", status.inner_text()).group(1))
        t = time.perf_counter()
        ui.wait_progress(rf"succeeded · 100 % · step {args.dpo_steps} / {args.dpo_steps}")
        dpo["ui_resume_to_succeeded_s"] = round(time.perf_counter() - t, 2)
        dpo["watching_cpu"] = CpuMeter.delta(cpu0, meter.sample())
        dpo["result_line"] = ui.text("train-result").strip()
        dpo["provenance"] = ui.text("train-provenance").strip()
        dpo["log_tail"] = ui.text("train-log").strip().splitlines()[-6:]
        if "resumed_job_id" in dpo:
            dpo["resumed_job"] = job_facts(studio.data_dir, dpo["resumed_job_id"])
        out["dpo"] = dpo

        # 3. The registry as the page shows it, and Verify on each trained checkpoint.
        page.locator("#ckpt-refresh").click()
        time.sleep(2)
        out["lineage_text"] = ui.text("ckpt-lineage").strip().splitlines()
        out["verify"] = {}
        for job in (rm["job"], dpo["cancelled_job"], dpo.get("resumed_job") or dpo["cancelled_job"]):
            if job["output_checkpoint_id"]:
                out["verify"][str(job["output_checkpoint_id"])] = ui.verify(job["output_checkpoint_id"])
        page.screenshot(path=str(Path(args.work) / "training_tab.png"), full_page=True)
        out["jobs_table"] = ui.text("train-jobs").strip().splitlines()
        browser.close()


# ----------------------------------------------------------------------------- headless


def run_cli(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command to the end; exit code, wall time, and the last JSON line it printed."""
    start = time.perf_counter()
    with open(log, "wb") as handle:
        code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    summary = None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return {
        "exit_code": code,
        "wall_s": round(time.perf_counter() - start, 2),
        "summary": summary,
        "log": str(log),
    }


def headless_part(data_dir: Path, work: Path, jobs: dict[str, dict[str, Any]], out: dict[str, Any]) -> None:
    """The browser's two jobs again: each recipe's CLI, then `studio worker` on jobs queued by the service."""
    from studio.services import Services
    from studio.settings import Settings

    head = work / "headless"
    head.mkdir()
    results: dict[str, Any] = {}
    for recipe, job in jobs.items():
        config = json.loads((Path(job["output_dir"]) / "config.json").read_text())
        config["output_dir"] = str(head / recipe)
        path = head / f"{recipe}.json"  # JSON is YAML: the recipes' --config reads it
        path.write_text(json.dumps(config, indent=2))
        command = (
            [sys.executable, "-m", "trainers", recipe, "--config", str(path)]
            if recipe == "reward_model"
            else [STUDIO_BIN, "train", recipe, "--config", str(path)]
        )
        result = run_cli(command, head / f"{recipe}.log")
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        result["command"] = " ".join(Path(c).name if c == sys.executable else c for c in command)
        result["median_step_s"] = median(step_times(head / recipe / "metrics.jsonl"))
        result["final_exists"] = (head / recipe / "final" / "COMPLETE").exists()
        results[f"cli_{recipe}"] = result

    # The worker alone: queue both jobs through the service (as the tab does), run `studio worker`.
    from storage.db import upgrade

    settings = Settings(data_dir=data_dir)
    db = database(data_dir)
    upgrade(db.engine)
    services = Services.build(settings, db)
    queued = {}
    for recipe, job in jobs.items():
        values = dict(job["form"])
        info = services.jobs.launch(
            ADMIN, project_id=job["project_id"], recipe=recipe, snapshot_id=job["snapshot_id"],
            base_checkpoint_id=job["base_checkpoint_id"], values=values, name=f"{recipe} via studio worker",
        )  # fmt: skip
        queued[recipe] = info.id
    db.dispose()
    env = {**os.environ, "STUDIO_DATA_DIR": str(data_dir)}
    start = time.perf_counter()
    with open(head / "worker.log", "wb") as handle:
        worker = subprocess.Popen(
            [STUDIO_BIN, "worker"], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: all(
                    job_facts(data_dir, i)["state"] in ("succeeded", "failed", "cancelled")
                    for i in queued.values()
                ),
                3600,
                "the worker's jobs",
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker_code = worker.wait(120)
    results["worker"] = {
        "command": "studio worker",
        "wall_s": round(time.perf_counter() - start, 2),
        "exit_code": worker_code,
        "jobs": {recipe: job_facts(data_dir, i) for recipe, i in queued.items()},
    }
    out["headless"] = results


# ----------------------------------------------------------------------------- main


def make_pairs(work: Path, n: int) -> Path:
    """`n` synthetic preference pairs (the README's `python -m trainers.synthetic`)."""
    folder = work / "synthetic"
    subprocess.run(
        [sys.executable, "-m", "trainers.synthetic", str(folder), "--train", str(n), "--eval", "8"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return folder / "train.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--rm-steps", type=int, default=30)
    parser.add_argument("--dpo-steps", type=int, default=3)
    parser.add_argument("--dpo-max-length", type=int, default=96)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data, logs, screenshot)")
    parser.add_argument("--skip-headless", action="store_true")
    args = parser.parse_args(argv)
    args.work = tempfile.mkdtemp(prefix="studio-default-setup-")
    work = Path(args.work)
    out: dict[str, Any] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "work_dir": str(work),
        "problems": [],
        "notes": [],
    }
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the studio below is stopped too
    studio = Studio(work)
    out["studio_ready_s"] = studio.ready_s
    try:
        browser_part(studio, make_pairs(work, args.pairs), args, out)
    except Exception as exc:
        out["problems"].append(f"browser: {type(exc).__name__}: {str(exc)[:2000]}")
    finally:
        out["studio_exit_code"] = studio.stop()
        out["studio_log_tail"] = studio.log_path.read_text(errors="replace").splitlines()[-15:]
    out["registry"] = registry(studio.data_dir)
    out["browser_s"] = round(time.perf_counter() - started, 1)
    if not args.skip_headless and "rm" in out and "dpo" in out:
        dpo_job = out["dpo"].get("resumed_job") or out["dpo"]["cancelled_job"]
        forms = out["forms"]
        jobs = {
            "reward_model": {**out["rm"]["job"], "form": forms["reward_model"]},
            "dpo": {**dpo_job, "form": forms["dpo"]},
        }
        project = _project_of(studio.data_dir, out["rm"]["job"]["id"])
        for job in jobs.values():
            job["project_id"] = project
        try:
            headless_part(studio.data_dir, work, jobs, out)
        except Exception as exc:
            out["problems"].append(f"headless: {type(exc).__name__}: {str(exc)[:2000]}")
    out["total_s"] = round(time.perf_counter() - started, 1)
    out["checks"] = checks(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({k: out[k] for k in ("checks", "problems", "notes", "total_s")}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(out["checks"].values()) and not out["problems"] else 1


def _project_of(data_dir: Path, job_id: int) -> int:
    from storage.models import Job

    db = database(data_dir)
    try:
        with db.read() as s:
            return s.get(Job, job_id).project_id
    finally:
        db.dispose()


def checks(out: dict[str, Any]) -> dict[str, bool]:
    """The done-when, item by item, from what was recorded."""
    by_id = {c["id"]: c for c in out.get("registry", [])}
    rm = out.get("rm", {}).get("job", {})
    dpo = out.get("dpo", {})
    cancelled = dpo.get("cancelled_job", {})
    resumed = dpo.get("resumed_job", {})
    rm_ckpt = by_id.get(rm.get("output_checkpoint_id"), {})
    dpo_ckpt = by_id.get(resumed.get("output_checkpoint_id"), {})
    stop_ckpt = by_id.get(cancelled.get("output_checkpoint_id"), {})
    base = by_id.get(resumed.get("base_checkpoint_id"), {})
    head = out.get("headless", {})
    worker_jobs = head.get("worker", {}).get("jobs", {})
    return {
        "rm_succeeded_in_browser": rm.get("state") == "succeeded",
        "rm_checkpoint_reward_ready": rm_ckpt.get("kind") == "reward" and rm_ckpt.get("status") == "ready",
        "dpo_cancelled_after_checkpoint": cancelled.get("state") == "cancelled"
        and stop_ckpt.get("kind") == "policy",
        "dpo_resumed_and_succeeded": resumed.get("state") == "succeeded"
        and resumed.get("parent_job_id") == cancelled.get("id"),
        "dpo_checkpoint_policy_under_base": dpo_ckpt.get("kind") == "policy"
        and base.get("recipe") == "base"
        and dpo_ckpt.get("parent_id") == base.get("id"),
        "lineage_shows_both": any(f"#{rm_ckpt.get('id')} " in line for line in out.get("lineage_text", []))
        and any(f"└─ #{dpo_ckpt.get('id')} " in line for line in out.get("lineage_text", [])),
        "verify_ok": bool(out.get("verify"))
        and all("matches its manifest" in v for v in out["verify"].values()),
        "cli_rm_ok": head.get("cli_reward_model", {}).get("exit_code") == 0,
        "cli_dpo_ok": head.get("cli_dpo", {}).get("exit_code") == 0,
        "worker_jobs_ok": bool(worker_jobs) and all(j["state"] == "succeeded" for j in worker_jobs.values()),
    }


if __name__ == "__main__":
    sys.exit(main())

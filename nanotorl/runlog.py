"""What a training run shows and writes as it goes, on rank 0: a console line and a progress bar per step,
``metrics.jsonl`` (cut back to the resumed step when a run resumes, :func:`nanotorl.samples.drop_after`), and
TensorBoard and wandb when asked. The responses it keeps are :class:`nanotorl.samples.SampleLog`'s."""
import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from nanotorl.samples import drop_after


class Log:
    """Rank 0 writes: a console line and a tqdm bar per step, metrics.jsonl, and optionally TensorBoard/wandb."""

    def __init__(self, cfg, rank: int, start: int):
        self.on = rank == 0
        self.file = Path(cfg.log.out_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if not self.on:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        drop_after(self.file, start, log=tqdm.write)  # what a crashed run logged after its last checkpoint
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(Path(cfg.log.out_dir) / "tensorboard")
        if cfg.log.wandb_project:
            import wandb
            self.wandb = wandb.init(project=cfg.log.wandb_project, config=asdict(cfg), resume="allow")
        self.bar = tqdm(total=cfg.steps, initial=start, desc="ToRL", dynamic_ncols=True)

    def __call__(self, record: dict):
        if not self.on:
            return
        try:
            with self.file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file (the torn line this may leave is dropped on restart)
            raise OSError(e.errno, e.strerror, str(self.file)) from None
        keys = ("reward", "accuracy", "tool_fraction", "calls_ok_fraction", "response_length", "eval_accuracy",
                "eval_tool_fraction", "entropy", "logprob_gap_max", "tokens_per_s", "memory_generate_gb",
                "memory_train_gb", "memory_save_gb")
        line = " ".join(f"{k}={record[k]:.3g}" for k in keys if record.get(k) is not None)
        if record.get("skipped"):
            line += f" | update skipped: loss {record['loss']:.3g}, grad norm {record['grad_norm']:.3g}"
        if self.bar is not None and record["step"] > 0:
            self.bar.update(record["step"] - self.bar.n)
        tqdm.write(f"step {record['step']:4d} | {line}")
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """End the bar (so that a following error starts its own line) and the TensorBoard and wandb runs."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

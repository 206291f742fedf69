"""Settings shared by the task kinds' end-to-end tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    """A CSV file with `header` and `rows` (quoted as csv does: commas, quotes and line breaks survive)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """A JSON-lines file, one object per row."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_params(tmp: Path, teacher: Path, data: dict[str, Any], *, keep_layers: Sequence[int] = (0, 3),
                 kd: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict:
    """Params that run every stage on tiny models in a few seconds, writing under `tmp`.

    `teacher` is fine-tuned by train-teacher, cached by precompute (float32, so cached == online) and cut to
    `keep_layers` for the student; `data` is the data section and `kd` the distill.kd section. Each of
    `sections` then updates its section (one level deep), as the tests' overrides.
    """
    p = {
        "data": data,
        "train_teacher": {"model": str(teacher), "output": str(tmp / "teacher"), "epochs": 1, "batch_size": 16,
                          "max_length": 32, "lr": 1e-3, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"teachers": [str(teacher)], "cache_root": str(tmp / "caches"), "batch_size": 16,
                       "max_length": 32, "dtype": "float32"},
        "distill": {"student": {"from_teacher": str(teacher), "keep_layers": list(keep_layers)}, "epochs": 1,
                    "batch_size": 16, "max_length": 32, "lr": 1e-3, "output": str(tmp / "student"),
                    "log_dir": str(tmp / "live"), "metrics": str(tmp / "m_distill.json"), "kd": dict(kd or {})},
        "evaluate": {"models": {"teacher": str(teacher), "student": str(tmp / "student")}, "max_length": 32,
                     "throughput_batches": 1, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    return p


def start_moto_server() -> tuple[Any, dict[str, str]]:
    """Start a local S3-compatible HTTP server (moto's server mode) on a free port.

    Returns the server (call `.stop()`) and the environment that points s3fs/botocore at it with fake credentials
    and no fallback to the user's ~/.aws or the instance metadata service. Set it (os.environ, monkeypatch) before
    the first s3:// access; s3fs caches its instances, so call `s3fs.S3FileSystem.clear_instance_cache()` after
    changing it. Needs the test extra (moto[server]).
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "kd-test-key",
        "AWS_SECRET_ACCESS_KEY": "kd-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kd-test/credentials",
        "AWS_CONFIG_FILE": "/nonexistent/kd-test/config",
    }
    return server, env

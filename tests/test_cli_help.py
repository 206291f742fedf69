"""`kd distill --help` names every setting of the distillation methods (README "Distillation methods")."""

from __future__ import annotations

import re

from click.testing import CliRunner

from pipeline.cli import cli
from stages.config import FastBertConfig, TheseusConfig


def test_distill_help_names_the_method_settings():
    out = CliRunner().invoke(cli, ["distill", "--help"], terminal_width=200)
    assert out.exit_code == 0, out.output
    text = re.sub(r"\s+", " ", out.output)
    names = ["distill.method=theseus", "distill.method=fastbert", "distill.student.module", "module_kwargs",
             "eval_every", "keep_best", "snapshots", "callbacks", "distill.matches", "projection_lr",
             "distill.match_preset", "gram", "nst", *TheseusConfig.model_fields, *FastBertConfig.model_fields]
    assert [n for n in names if n not in text] == []

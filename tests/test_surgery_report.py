"""The declared surgery report protocol: one record file with a ``kind``, old records still read,
and the collapse methods / prune criteria as registries."""

from __future__ import annotations

import json
import shutil

import pytest

from splice.checkpoint import open_checkpoint
from splice.errors import SpliceError
from splice.surgery import (
    RECORD,
    CollapseReport,
    HealReport,
    Report,
    SliceReport,
    SurgeryReport,
    read_record,
    upscale,
)
from splice.surgery.heal import trained_layers


def reports() -> list[Report]:
    return [
        SurgeryReport(operation="upscale --solar 1", source="m", num_layers=2, layers=[0, 1, 1]),
        HealReport(
            operation="heal",
            source="m",
            num_layers=2,
            steps=1,
            lr=1e-4,
            batch_size=1,
            seq_len=8,
            text="t",
            text_tokens=10,
            trained_layers=None,
            losses=[1.0],
        ),
        CollapseReport(
            operation="collapse --method uniform",
            source="m",
            method="uniform",
            num_experts=4,
            top_k=2,
            intermediate_size=8,
            out_intermediate_size=8,
        ),
        SliceReport(
            operation="slice --sparsity 0.25 --basis shared",
            source="m",
            basis="shared",
            sparsity=0.25,
            num_layers=2,
            hidden_size=64,
            new_hidden_size=48,
            params_source=100,
            params_output=80,
        ),
    ]


@pytest.mark.parametrize("report", reports(), ids=lambda r: r.kind)
def test_every_report_is_a_report_with_a_kinded_record(report, tmp_path):
    assert isinstance(report, Report)
    record = json.loads(report.record())
    assert record == {"kind": report.kind, **report.to_dict()}
    assert "kind" not in report.to_dict()  # --json prints the fields as before
    assert report.title.startswith(report.operation)
    assert report.card_details().endswith(f"The full record is in `{RECORD}`.")
    report.scores = {"output": {"ppl": 3.5}}
    assert report.summary().splitlines()[-1] == "  output: ppl 3.5"
    (tmp_path / RECORD).write_text(report.record())
    assert read_record(tmp_path) == {**record, "scores": report.scores}


def test_kinds_are_distinct():
    assert [r.kind for r in reports()] == ["depth", "heal", "collapse", "slice"]


@pytest.mark.parametrize("report", reports(), ids=lambda r: r.kind)
def test_records_of_older_versions_are_read(report, tmp_path):
    """Before ``kind``: every verb's record without it (the kind is told from the fields), a
    slicing's under ``splice_slicing.json``."""
    old = json.dumps(report.to_dict())
    name = "splice_slicing.json" if report.kind == "slice" else RECORD
    (tmp_path / name).write_text(old)
    assert read_record(tmp_path) == {"kind": report.kind, **report.to_dict()}


def test_read_record_none_and_bad(tmp_path):
    assert read_record(tmp_path) is None
    (tmp_path / RECORD).write_text("[1, 2]")
    with pytest.raises(SpliceError, match="not a JSON object"):
        read_record(tmp_path)
    (tmp_path / RECORD).write_text("{")
    with pytest.raises(SpliceError, match="cannot read it"):
        read_record(tmp_path)


def test_only_new_layers_reads_an_old_record(tiny_models, tmp_path):
    """A model up-scaled by an older splice (its record has no ``kind``) still heals its new
    layers only."""
    grown = tmp_path / "g"
    upscale(tiny_models["llama"], grown, expand=2)
    record = json.loads((grown / RECORD).read_text())
    assert record["kind"] == "depth" and record["new_layers"] == [2, 5]
    del record["kind"]
    old = tmp_path / "old"
    shutil.copytree(grown, old)
    (old / RECORD).write_text(json.dumps(record))
    layers, previous = trained_layers(open_checkpoint(old), True, None)
    assert layers == [2, 5] and previous is not None and previous["kind"] == "depth"


def test_choices_are_registries():
    from splice.surgery.collapse_methods import KEEP_METHODS, METHODS
    from splice.surgery.prune import CRITERIA

    assert CRITERIA.names() == ["angular", "influence"]
    assert METHODS.names() == ["frequency", "slice", "uniform"]
    assert KEEP_METHODS.names() == ["merge", "prune"]
    assert [METHODS.get(m).calibrated for m in ("uniform", "frequency", "slice")] == [
        False,
        True,
        True,
    ]
    assert [m for m in METHODS if METHODS.get(m).neurons] == ["slice"]

"""Strict CSV inputs (issue 17, defect 5): malformed rows are reported with their lines and skipped (reports
CSV) or refused (reg2rg-eval input, a damaged predictions.csv), never merged; non-UTF-8 is one clear line;
a predictions.csv cut mid-row is repaired before appending; reg2rg-eval reads fields of any length."""

from __future__ import annotations

import csv
import logging

import pytest

import bad_inputs
from reg2rg.engine.csvtable import read_csv, repair_torn_tail
from reg2rg.engine.dataset import DatasetError, read_reports


def test_an_unterminated_quote_skips_its_row_and_merges_nothing(tmp_path, caplog):
    path = bad_inputs.reports_unterminated_quote(tmp_path)
    with caplog.at_level(logging.WARNING):
        reports = read_reports(path)
    # the lenient csv module made one 100-character "sentence" of lines 3-6; here line 3 alone is skipped
    assert reports["v_1_a_1"] == {"lung": "Lungs clear."}
    assert reports["v_2_a_1"] == {"lung": "Small nodule in the right upper lobe.", "heart": "Cardiomegaly."}
    assert reports["v_3_a_1"] == {"lung": "Emphysema, moderate."}
    assert max(len(s) for r in reports.values() for s in r.values()) < 40
    warning = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warning) == 1
    assert f"{path}: 1 malformed row(s) skipped: line 3: a quote opened on line 3 is not closed " \
           "(line 4 starts a new row)" in warning[0]


def test_extra_fields_are_reported_not_added_to_the_target(tmp_path, caplog):
    path = bad_inputs.reports_extra_fields(tmp_path)
    with caplog.at_level(logging.WARNING):
        reports = read_reports(path)
    assert reports == {"v_1_a_1": {"heart": "Heart normal."}}
    assert "line 2: 4 fields, more than the header's 3 (an unquoted comma in a text?)" in caplog.text


def test_non_utf8_is_one_clear_line(tmp_path):
    path = bad_inputs.reports_latin1(tmp_path)
    with pytest.raises(DatasetError) as info:
        read_reports(path)
    assert str(info.value) == (f"{path}: not UTF-8 text (line 3 has the byte 0xf6); save it as UTF-8 "
                               "(in a spreadsheet: CSV UTF-8)")


def test_a_legitimate_multiline_quoted_field_is_kept(tmp_path):
    path = tmp_path / "multiline.csv"
    path.write_text('Volumename,Anatomy,Sentence\nv.nii.gz,lung,"Lungs clear,\nno effusion."\nw.nii.gz,heart,Ok.\n')
    table = read_csv(path)
    assert not table.all_problems
    assert [(line, row["Sentence"]) for line, row in table.rows] == [(2, "Lungs clear,\nno effusion."), (4, "Ok.")]


def test_a_torn_last_row_is_cut_off_before_appending(tmp_path):
    path = bad_inputs.predictions_torn(tmp_path)
    table = read_csv(path, ("AccNum",))
    assert [row["AccNum"] for _, row in table.rows] == ["v_1_a_1"] and not table.problems
    assert table.torn is not None and table.torn.first_line == 3
    message = repair_torn_tail(table)
    assert message == (f"{path}: line 3: the file ends inside this row (a quote is never closed; cut off by an "
                       "interruption?); removed it before appending")
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["v_2_a_1", "gt", "pred", "{}"])
    again = read_csv(path, ("AccNum",))
    assert not again.all_problems and [row["AccNum"] for _, row in again.rows] == ["v_1_a_1", "v_2_a_1"]
    # a complete last row without its line end gets one, so the next row starts on a line of its own
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    table = read_csv(path, ("AccNum",))
    assert table.torn is None and not table.ends_with_newline
    assert repair_torn_tail(table) is None and path.read_bytes().endswith(b"\r\n")


def test_reg2rg_eval_reads_huge_fields_and_refuses_malformed_rows(tmp_path, capsys):
    from reg2rg.train.eval_cli import main, read_predictions

    long = bad_inputs.predictions_huge_field(tmp_path)
    preds = read_predictions(long)
    assert len(preds.preds[0]) > 131072 and preds.ids == ["v_1_a_1", "v_2_a_1"]
    assert csv.field_size_limit() == 131072                     # the process-wide limit is restored
    torn = bad_inputs.predictions_torn(tmp_path)
    assert main([str(torn), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "1 malformed row(s), nothing evaluated: line 3: the file ends inside this row" in err
    assert "Traceback" not in err and not (tmp_path / "eval").exists()

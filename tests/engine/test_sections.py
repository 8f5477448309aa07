"""Region-section parsing: well-formed and malformed model output, offsets, published stripping."""

import math
import re

import pytest

from reg2rg.engine.regions import REGIONS
from reg2rg.engine.sections import (
    RegionSection,
    parse_sections,
    region_prediction_accuracy,
    sections_by_area,
    slot_areas,
    strip_region_prefixes,
)

WELL_FORMED = (
    "The region 0 is heart: The heart is normal in size. No pericardial effusion. "
    "The region 1 is lung: Both lungs are clear. "
    "The region 2 is trachea and bronchie: The trachea is patent. "
)


def _published_strip(text: str) -> str:
    # The published rm_region_text.py, step by step.
    text = re.sub(r"The region \d+ is [^:]+: ", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _published_by_name(text: str) -> dict[str, str]:
    # The published parse_report_to_region.py (region names as they appear in the data).
    out = {}
    for name in REGIONS:
        matches = re.findall(rf"The region \d+ is {name}:(.+?)(?=(The region \d+ is|$))", text, re.DOTALL)
        joined = " ".join(m[0].strip() for m in matches if m[0].strip())
        if joined:
            out[name] = joined
    return out


def _check_offsets(text: str, sections: list[RegionSection]) -> None:
    for s in sections:
        assert text[s.body_start : s.body_start + len(s.text)] == s.text
        assert s.start <= s.body_start <= s.end <= len(text)
        assert text[s.start : s.end] == text[s.start : s.end].strip()
    for a, b in zip(sections, sections[1:]):
        assert a.end <= b.start


def test_well_formed_report():
    sections = parse_sections(WELL_FORMED)
    assert [(s.slot, s.area, s.raw_area) for s in sections] == [
        (0, "heart", "heart"),
        (1, "lung", "lung"),
        (2, "trachea and bronchie", "trachea and bronchie"),
    ]
    assert sections[0].text == "The heart is normal in size. No pericardial effusion."
    assert WELL_FORMED[sections[1].start : sections[1].end] == "The region 1 is lung: Both lungs are clear."
    _check_offsets(WELL_FORMED, sections)
    assert sections_by_area(sections) == _published_by_name(WELL_FORMED)


def test_strip_matches_published_script():
    texts = [
        WELL_FORMED,
        "The region 3 is bone:   Degenerative   changes.\nThe region 10 is pleura: No effusion.  ",
        "The region 1 is lung The lungs are clear. The region 2 is heart: Normal.",  # missing colon
        "no sections at all",
        "",
    ]
    for t in texts:
        assert strip_region_prefixes(t) == _published_strip(t)
    assert strip_region_prefixes(WELL_FORMED) == (
        "The heart is normal in size. No pericardial effusion. Both lungs are clear. The trachea is patent."
    )


def test_malformed_output_is_tolerated():
    text = (
        "Findings follow. "
        "The region 0 is heart The heart is enlarged. "  # missing colon
        "The region 1 is kidney: Unremarkable. "  # unknown area
        "The region 2 is Trachea: Patent airway. "  # case and alias
        "The region 0 is bone: Old rib fracture. "  # repeated slot
        "The region 4 is"  # truncated at the end of generation
    )
    sections = parse_sections(text)
    assert [(s.slot, s.area, s.raw_area, s.text) for s in sections] == [
        (None, None, "", "Findings follow."),
        (0, "heart", "heart", "The heart is enlarged."),
        (1, None, "kidney", "Unremarkable."),
        (2, "trachea and bronchie", "Trachea", "Patent airway."),
        (0, "bone", "bone", "Old rib fracture."),
        (4, None, "", ""),
    ]
    _check_offsets(text, sections)
    assert slot_areas(sections) == {0: "heart", 1: None, 2: "trachea and bronchie", 4: None}
    assert sections_by_area(sections) == {
        "heart": "The heart is enlarged.",
        "trachea and bronchie": "Patent airway.",
        "bone": "Old rib fracture.",
    }


def test_same_area_twice_is_joined_like_published():
    text = "The region 0 is lung: Nodule in the right lung. The region 5 is lung: Emphysema."
    assert sections_by_area(parse_sections(text)) == _published_by_name(text) == {
        "lung": "Nodule in the right lung. Emphysema."
    }


def test_colon_in_body_does_not_move_the_area():
    text = "The region 0 is heart. Ratio: 0.5. The region 1 is pleura: Note: small effusion."
    sections = parse_sections(text)
    assert (sections[0].area, sections[0].text) == ("heart", "Ratio: 0.5.")
    assert (sections[1].area, sections[1].text) == ("pleura", "Note: small effusion.")


def test_region_prediction_accuracy():
    sections = parse_sections(
        "The region 0 is heart: a. The region 1 is lung: b. The region 2 is bone: c. The region 1 is pleura: d."
    )
    truth = {0: "heart", 1: "lung", 2: "abdomen", 3: "Trachea_and_Bronchie"}
    # slot 0 right, slot 1 right (first occurrence wins), slot 2 wrong, slot 3 never written
    assert region_prediction_accuracy(sections, truth) == pytest.approx(0.5)
    assert region_prediction_accuracy(sections, {0: "heart"}) == 1.0
    assert math.isnan(region_prediction_accuracy(sections, {}))
    assert region_prediction_accuracy(parse_sections("The region 3 is trachea: x"), {3: "trachea and bronchie"}) == 1.0

"""Labels and statistics of a large synthetic cohort in chunks: same result anywhere, memory independent of size."""

from __future__ import annotations

import tracemalloc

import pandas as pd
import pytest

from lib import reports, scale


def _tables(summary: dict) -> dict[str, pd.DataFrame]:
    return {k: v.sort_index() for k, v in scale.summary_tables(summary).items()}


def test_a_chunk_is_reproducible_alone_and_ids_never_collide():
    a, b = scale.study_chunk(3, 40), scale.study_chunk(3, 40)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 40 and a.study_id.str.startswith("C00003_").all()
    assert not set(a.patient_id) & set(scale.study_chunk(4, 40).patient_id)
    texts = scale.report_chunk(a, ("en", "ja"))
    assert len(texts) == 80 and set(texts.lang) == {"en", "ja"}


def test_summary_counts_match_labelling_the_whole_cohort_at_once():
    n, chunk = 90, 30
    summary = scale.stream_summary(n, chunk=chunk, langs=("en",), workers=1, progress=False)
    studies = pd.concat([scale.study_chunk(k, chunk) for k in range(n // chunk)], ignore_index=True)
    texts = scale.report_chunk(studies, ("en",))  # patients never span chunks: the same reports
    labels, evidence = reports.label_reports_with_evidence(list(texts.text), "abdominal-ct", "en",
                                                           list(texts.study_id))
    whole = scale.merge_summaries(scale.study_summary(studies),
                                  scale.label_summary_counts(labels, evidence, "en"))
    whole = scale.merge_summaries(whole, scale.length_summary(texts))
    assert summary["studies_sum"]["studies"] == n and summary["reports_sum"][("en", "reports")] == n
    for key in ("studies_sum", "labels_sum", "assertions_sum", "length_sum", "length_min", "length_max",
                "length_hist_sum"):
        pd.testing.assert_series_equal(summary[key].sort_index(), whole[key].sort_index(), check_names=False)


@pytest.mark.slow
def test_process_pool_gives_the_same_summary_as_one_process():
    one = scale.stream_summary(60, chunk=20, workers=1, progress=False)
    two = scale.stream_summary(60, chunk=20, workers=2, progress=False)
    for name, table in _tables(one).items():
        pd.testing.assert_frame_equal(table, _tables(two)[name])


def _peak_traced(n: int, chunk: int) -> int:
    tracemalloc.start()
    try:
        scale.stream_summary(n, chunk=chunk, workers=1, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_studies():
    scale.stream_summary(50, chunk=50, workers=1, progress=False)  # imports, vocabularies, caches first
    small = _peak_traced(100, chunk=50)
    large = _peak_traced(400, chunk=50)  # 4x the studies: a whole-cohort table would need about 4x the memory
    assert large < 1.3 * small + (1 << 20), f"peak traced memory {small / 2**20:.1f} MiB for 100 studies, " \
                                            f"{large / 2**20:.1f} MiB for 400"
    assert large < 64 << 20

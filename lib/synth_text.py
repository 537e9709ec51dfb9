"""Report text for the synthetic cohort, in English and Japanese, generated from the findings.

Why separate from the volumes: the text is where label noise comes from, so its variety is what
``01_labels_from_reports`` is tested against. It has hedged positives ("possible", 「疑い」), hedged
negatives ("cannot be excluded", 「否定できない」), explicit negations, normal statements, organs
left unmentioned, comparisons with priors, measurements, historical and indication mentions, and
findings outside the abdomen. What a reader *should* conclude is in ``ground_truth/``, never here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

# (english name, japanese name) of each finding, and phrases that state it.
TERMS: dict[str, dict[str, list[str]]] = {
    "liver_cyst": {"en": ["hepatic cyst", "liver cyst", "simple cyst in the liver"], "ja": ["肝嚢胞"]},
    "liver_mass": {"en": ["hepatic mass", "liver mass", "hypodense hepatic lesion suspicious for neoplasm"],
                   "ja": ["肝腫瘤", "肝腫瘍"]},
    "liver_fatty": {"en": ["hepatic steatosis", "fatty liver", "diffuse fatty infiltration of the liver"],
                    "ja": ["脂肪肝", "肝脂肪沈着"]},
    "liver_hepatomegaly": {"en": ["hepatomegaly", "enlarged liver"], "ja": ["肝腫大"]},
    "spleen_splenomegaly": {"en": ["splenomegaly", "enlarged spleen"], "ja": ["脾腫", "脾腫大"]},
    "spleen_lesion": {"en": ["splenic lesion", "hypodense splenic lesion", "splenic mass"],
                      "ja": ["脾腫瘤", "脾臓の低吸収病変"]},
    "pancreas_mass": {"en": ["pancreatic mass", "pancreatic tumor", "hypoenhancing pancreatic lesion"],
                      "ja": ["膵腫瘤", "膵腫瘍"]},
    "pancreas_duct_dilatation": {"en": ["pancreatic duct dilatation", "dilated main pancreatic duct",
                                        "dilatation of the pancreatic duct"],
                                 "ja": ["主膵管拡張", "膵管拡張"]},
    "pancreas_cyst": {"en": ["pancreatic cyst", "cystic lesion of the pancreas"], "ja": ["膵嚢胞", "膵嚢胞性病変"]},
    "kidney_cyst": {"en": ["renal cyst", "kidney cyst", "simple renal cyst"], "ja": ["腎嚢胞"]},
    "kidney_stone": {"en": ["renal stone", "nephrolithiasis", "renal calculus", "kidney stone"],
                     "ja": ["腎結石"]},
    "gallbladder_gallstone": {"en": ["gallstone", "cholelithiasis", "gallbladder stone"],
                              "ja": ["胆嚢結石", "胆石"]},
}
ORGAN_NAMES = {"liver": ("liver", "肝臓"), "spleen": ("spleen", "脾臓"), "pancreas": ("pancreas", "膵臓"),
               "kidney": ("kidneys", "両腎"), "gallbladder": ("gallbladder", "胆嚢")}
NORMAL = {
    "en": ["The {o} is unremarkable.", "The {o} is normal in size and attenuation.",
           "No abnormality of the {o}.", "The {o} appears normal."],
    "ja": ["{o}に異常を認めない。", "{o}に明らかな異常所見はない。", "{o}は正常範囲内。", "{o}に特記すべき所見なし。"],
}
NEGATED = {
    "en": ["No {t}.", "No evidence of {t}.", "There is no {t}.", "Negative for {t}.",
           "No {t} is identified.", "{T} is not seen."],
    "ja": ["{t}は認めない。", "{t}は指摘できない。", "明らかな{t}はない。", "{t}なし。", "{t}の所見はみられない。"],
}
AFFIRMED = {
    "en": ["{T}{m}.", "There is {a} {t}{m}.", "{A} {t} is noted{m}.", "Findings consistent with {t}{m}.",
           "{A} {t} is seen{m}, unchanged in character."],
    "ja": ["{t}を認める{m}。", "{m2}{t}あり。", "{t}を認めます{m}。", "{m2}{t}がみられる。", "{t}と考えます{m}。"],
}
HEDGED = {
    "en": ["Possible {t}.", "{T} cannot be excluded.", "Findings may represent {t}.",
           "Questionable {t}{m}.", "Cannot rule out {t}.", "Suspicious for {t}, correlate clinically."],
    "ja": ["{t}の疑い。", "{t}を否定できない。", "{t}の可能性あり。", "{t}疑い。", "{t}が疑われる。"],
}
COMPARISON = {
    "en": [" Compared with the prior study of {d}, this is unchanged.", " Stable since {d}.",
           " Slightly larger than on {d}."],
    "ja": ["前回({d})と比較して著変なし。", "前回({d})より軽度増大。", "前回({d})と同様。"],
}
OUTSIDE = {
    "en": ["Small bilateral pleural effusions.", "Mild atherosclerotic calcification of the aorta.",
           "Degenerative changes of the lumbar spine.", "Bibasilar atelectasis.",
           "A small hiatal hernia.", "Colonic diverticulosis without diverticulitis."],
    "ja": ["両側に少量の胸水を認める。", "腹部大動脈に石灰化を認める。", "腰椎に変形性変化あり。",
           "両側下葉に無気肺を認める。", "食道裂孔ヘルニアあり。", "結腸憩室を認めるが、憩室炎の所見はない。"],
}
INDICATION = {
    "en": ["Abdominal pain.", "Follow-up.", "Rule out {t}.", "Elevated liver enzymes.",
           "Weight loss, evaluate for {t}."],
    "ja": ["腹痛。", "経過観察。", "{t}の除外。", "肝機能障害。", "体重減少、{t}の評価。"],
}
HISTORY = {"en": "History of {t}.", "ja": "{t}の既往あり。"}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, "text") + keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _measure(lang: str, diameters: list[float], rng: np.random.Generator) -> tuple[str, str]:
    """Measurement phrase (suffix form, prefix form) from the lesion diameters."""
    if not diameters or rng.random() < 0.3:
        return "", ""
    d = max(diameters)
    if lang == "en":
        if rng.random() < 0.5:
            return f" measuring {d:.0f} mm", ""
        return f" measuring {d / 10:.1f} x {d / 10 * rng.uniform(0.7, 0.95):.1f} cm", ""
    return f"（最大径{d:.0f}mm）", f"{d:.0f}mm大の"


def _sentence(template: str, term: str, m: str = "", m2: str = "") -> str:
    article = "an" if term[0] in "aeiou" else "a"
    return template.format(t=term, T=term[0].upper() + term[1:], a=article, A=article.capitalize(),
                           m=m, m2=m2)


def reporting_errors(study: pd.Series, spec) -> dict[str, str]:  # noqa: ANN001 - CohortSpec
    """Findings the radiologist gets wrong in this study: ``{column: "missed" | "overcalled"}``.

    Why: real report labels disagree with the images (satisfaction of search, overcalls), and a label-noise
    study is only informative when they do. Drawn once per study, so the English and Japanese reports (the
    same read, two languages) carry the same errors; listed in ``ground_truth/report_errors.csv``.
    """
    from lib.synth import LABEL_COLUMNS

    rng = _rng(spec.seed, study.study_id, "reading")
    draws = {c: rng.random() for c in LABEL_COLUMNS}  # one draw per column: rates change errors, not streams
    errors = {}
    for c, u in draws.items():
        if int(study[c]) and u < spec.miss_rate:
            errors[c] = "missed"
        elif not int(study[c]) and u < spec.overcall_rate:
            errors[c] = "overcalled"
    return errors


def report_text(study: pd.Series, lesions: pd.DataFrame, prior_date: str | None, lang: str,
                spec, errors: dict[str, str] | None = None) -> str:  # noqa: ANN001 - CohortSpec, no import cycle
    """One report in ``lang`` for a study row of ``draw_patients`` with its ``reporting_errors`` (computed here
    unless the caller, writing both languages, passes them)."""
    from lib.synth import FINDINGS

    errors = reporting_errors(study, spec) if errors is None else errors
    rng = _rng(spec.seed, study.study_id, lang)
    findings_lines: list[str] = []
    impressions: list[str] = []
    for organ, fs in FINDINGS.items():
        oname = ORGAN_NAMES[organ][0 if lang == "en" else 1]
        organ_lines: list[str] = []
        for f in fs:
            col = f"{organ}_{f}"
            term = _pick(rng, TERMS[col][lang])
            if int(study[col]) != (col in errors):  # reported present: true positive or overcall
                diam = lesions.loc[(lesions.finding == f) & lesions.organ.str.startswith(organ),
                                   "diameter_mm"].tolist()
                m, m2 = _measure(lang, diam, rng)
                if rng.random() < spec.uncertain_rate:
                    organ_lines.append(_sentence(_pick(rng, HEDGED[lang]), term, m, m2))
                    impressions.append(_sentence(_pick(rng, HEDGED[lang]), term))
                else:
                    s = _sentence(_pick(rng, AFFIRMED[lang]), term, m, m2)
                    if prior_date and rng.random() < 0.5:
                        s += _pick(rng, COMPARISON[lang]).format(d=prior_date)
                    organ_lines.append(s)
                    impressions.append(term[0].upper() + term[1:] if lang == "en" else term)
            else:
                u = rng.random()
                if u < spec.false_hedge_rate:
                    organ_lines.append(_sentence(_pick(rng, HEDGED[lang]), term))
                elif u < spec.false_hedge_rate + 0.25:
                    organ_lines.append(_sentence(_pick(rng, NEGATED[lang]), term))
                elif u < spec.false_hedge_rate + 0.28:
                    organ_lines.append(HISTORY[lang].format(t=term))
        if not organ_lines:
            if rng.random() < spec.unmentioned_rate:
                continue
            organ_lines.append(_pick(rng, NORMAL[lang]).format(o=oname))
        findings_lines.extend(organ_lines)
    for _ in range(int(rng.integers(0, 3))):
        findings_lines.insert(int(rng.integers(0, len(findings_lines) + 1)), _pick(rng, OUTSIDE[lang]))

    any_term = _pick(rng, TERMS[_pick(rng, list(TERMS))][lang])
    indication = _pick(rng, INDICATION[lang]).format(t=any_term)
    if lang == "en":
        head = f"CLINICAL HISTORY: {indication}\n" if rng.random() < 0.6 else ""
        tech = "TECHNIQUE: CT of the abdomen and pelvis with intravenous contrast.\n"
        comp = f"COMPARISON: {prior_date}.\n" if prior_date else "COMPARISON: None.\n"
        body = "FINDINGS:\n" + ("\n".join(findings_lines) if rng.random() < 0.5 else " ".join(findings_lines))
        imp = ("\n".join(f"{i + 1}. {t}." for i, t in enumerate(impressions))
               if impressions else "No acute abnormality in the abdomen.")
        return f"{head}{tech}{comp}{body}\n\nIMPRESSION:\n{imp}\n"
    head = f"【臨床情報】{indication}\n" if rng.random() < 0.6 else ""
    comp = f"【比較】{prior_date}\n" if prior_date else ""
    bullet = rng.random() < 0.4
    body = "【所見】\n" + "\n".join(("・" if bullet else "") + s for s in findings_lines)
    imp = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(impressions)) if impressions else "腹部に明らかな異常なし。"
    return f"{head}{comp}{body}\n【診断】\n{imp}\n"


def write_reports(spec, studies: pd.DataFrame, lesions: pd.DataFrame, path: Path,  # noqa: ANN001
                  errors_path: Path | None = None) -> None:
    """reports.csv: one row per study and language (and the reading errors they contain, for evaluation)."""
    rows, errs = [], []
    prior: dict[str, str] = {}
    for _, st in studies.sort_values(["patient_id", "study_index"]).iterrows():
        les = lesions[lesions.study_id == st.study_id]
        errors = reporting_errors(st, spec)  # one read, written in two languages
        errs += [{"study_id": st.study_id, "label": c, "error": e} for c, e in errors.items()]
        for lang in ("en", "ja"):
            rows.append({"study_id": st.study_id, "patient_id": st.patient_id, "study_date": st.study_date,
                         "lang": lang, "text": report_text(st, les, prior.get(st.patient_id), lang, spec, errors)})
        prior[st.patient_id] = st.study_date
    pd.DataFrame(rows).to_csv(path, index=False)
    if errors_path is not None:
        pd.DataFrame(errs, columns=["study_id", "label", "error"]).to_csv(errors_path, index=False)

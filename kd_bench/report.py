"""The results of a distillation recipe: results.json, RESULTS.md and a plot."""

import datetime
import importlib.metadata
import json
import os
import platform

from kd_bench.files import atomic_write, write_json

OUTPUT_FILES = {
    "markdown": "RESULTS.md",
    "json": "results.json",
    "plot": "bleu_vs_speed.png",
}

READING_START = "<!-- reading:start -->"
READING_END = "<!-- reading:end -->"
READING_PLACEHOLDER = (
    "_Not written yet: two or three sentences reading the table honestly "
    "(where KD helped, where it did not, what was tried). This section is kept "
    "when the table is regenerated._"
)

PACKAGES = (
    "fairseq-kd",
    "ve-fairseq",
    "fairseq-fixed",
    "fairseq",
    "torch",
    "sacrebleu",
    "sentencepiece",
    "subword-nmt",
    "ctranslate2",
    "numpy",
)

BEAMS = ("beam1", "beam5")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment():
    """Date, machine and package versions, recorded beside the scores."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "gpu": (
                torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            ),
        },
        "versions": versions,
    }


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def build_rows(models, specs):
    """The table's rows of one direction: each model's scores and speeds, its
    speed-up relative to the teacher and its greedy decoding against the
    teacher's beam 5.

    Args:
        models: model name -> the ``score`` stage's entry.
        specs: the recipe's rows (``name``, ``label``...), in table order.
    """
    teacher = models.get("teacher", {})
    rows = []
    for spec in specs:
        m = models.get(spec["name"])
        if m is None:
            continue
        row = dict(spec)
        for key in ("params", "train_seconds", "train_updates", "scores", "speed"):
            row[key] = m.get(key)
        row["ct2_int8"] = m.get("ct2_int8")
        if m.get("given"):  # a teacher given, not trained here
            row["given"] = m["given"]
        if spec["name"] != "teacher":
            row["vs_teacher_beam5"] = against_teacher_beam5(m, teacher)
        row["speedup"] = {}
        for beam in BEAMS:
            mine, theirs = _get(m, "speed", "test", beam), _get(
                teacher, "speed", "test", beam
            )
            row["speedup"][beam] = round(mine / theirs, 2) if mine and theirs else None
        rows.append(row)
    return rows


def build_results(scores, meta):
    """One results dict from the recipe's scores and its description.

    Args:
        scores: the ``score`` stage's JSON (per-model BLEU/chrF, speeds,
            parameters, training times; date, machine, versions), per
            direction under ``directions`` for the multilingual recipe.
        meta: the recipe's description (corpus, pair, preset, command, rows,
            settings, published reference).

    Returns:
        The dict written to ``results.json``; rows in table order, each with
        its speed-up relative to the teacher, plus the goals' verdicts. For
        the multilingual recipe, the rows and goals of each direction under
        ``directions: {"de-en": {"rows", "goals", "teacher_share"[,
        "curves"]}, ...}`` (:func:`direction_results` gives one direction as
        a bilingual results dict).
    """
    # corpus, pair, preset, command, settings, goals' thresholds, reference...
    results = {k: v for k, v in meta.items() if k not in ("rows",)}
    for key in (
        "date",
        "machine",
        "versions",
        "eval_sets",
        "seqkd",
        "seqkd_engines",
        "curves",
        "stage_seconds",
    ):
        if key in scores:
            results[key] = scores[key]
    results["signatures"] = {
        "bleu": scores.get("bleu_signature"),
        "chrf": scores.get("chrf_signature"),
    }
    if "directions" in scores:
        results["directions"] = {}
        for pair in ordered_pairs(meta, scores["directions"]):
            found = scores["directions"][pair]
            rows = build_rows(found["models"], meta["rows"])
            entry = {
                "rows": rows,
                "goals": check_goals(
                    rows,
                    meta.get("goal_settings"),
                    found.get("curves"),
                    _get(meta, "settings", "curve"),
                ),
                "teacher_share": teacher_shares(rows),
            }
            if found.get("curves"):
                entry["curves"] = found["curves"]
            results["directions"][pair] = entry
        return results
    rows = build_rows(scores["models"], meta["rows"])
    results["rows"] = rows
    results["goals"] = check_goals(
        rows,
        meta.get("goal_settings"),
        scores.get("curves"),
        _get(meta, "settings", "curve"),
    )
    return results


def direction_results(results, pair):
    """One direction of multilingual results as a bilingual results dict
    (its ``rows``, ``goals`` and ``curves``; ``pair`` is the direction)."""
    found = results["directions"][pair]
    drop = ("directions", "curve", "curves")
    view = {k: v for k, v in results.items() if k not in drop}
    view.update(pair=pair, rows=found["rows"], goals=found["goals"])
    curves = curves_of(found, results.get("settings"))
    if curves:
        view["curves"] = curves
    return view


def curves_of(results, settings=None):
    """``{row: {"points": [...]}}``, the valid curves of a results dict.

    Results written before the curve covered several rows hold one
    ``curve``, of the row named in ``settings["curve"]["row"]``.
    """
    if results.get("curves"):
        return results["curves"]
    spec = (settings or results.get("settings") or {}).get("curve") or {}
    if results.get("curve") and spec.get("row"):
        return {spec["row"]: results["curve"]}
    return {}


def ordered_pairs(results, directions):
    """The directions in ``--lang-pairs`` order (``results["lang_pairs"]``;
    JSON files are written with sorted keys), then any other."""
    given = [p for p in results.get("lang_pairs") or [] if p in directions]
    return given + [p for p in directions if p not in given]


def directions_of(results):
    """``[(pair or None, bilingual results dict)]``: each direction's results
    in ``--lang-pairs`` order (the bilingual results themselves, with None)."""
    if "directions" not in results:
        return [(None, results)]
    return [
        (pair, direction_results(results, pair))
        for pair in ordered_pairs(results, results["directions"])
    ]


def teacher_shares(rows):
    """Each student's test BLEU as a share of the teacher's beam-5 BLEU.

    Returns:
        ``{row: {"beam1": greedy BLEU / teacher's beam 5, "beam5": beam 5 /
        teacher's beam 5}}`` (None where unknown).
    """
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    return {
        r["name"]: {b: _ratio(_bleu(r, beam=b), _bleu(teacher)) for b in BEAMS}
        for r in rows
        if r["name"] != "teacher"
    }


def _bleu(row, split="test", beam="beam5"):
    return _get(row, "scores", split, beam, "bleu")


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def against_teacher_beam5(row, teacher):
    """A row decoded greedily against the teacher's beam 5 (the deployment point).

    Returns:
        ``{"bleu_share": greedy BLEU / teacher's beam-5 BLEU (test),
        "speedup": greedy sent/s / teacher's beam-5 sent/s (fairseq, test),
        "ct2_speedup": the same in CTranslate2 int8}`` (None where unknown).
    """
    ct2 = lambda r, b: _get(r, "ct2_int8", b, "sentences_per_second")  # noqa: E731
    return {
        "bleu_share": _ratio(_bleu(row, beam="beam1"), _bleu(teacher)),
        "speedup": _ratio(
            _get(row, "speed", "test", "beam1"), _get(teacher, "speed", "test", "beam5")
        ),
        "ct2_speedup": _ratio(ct2(row, "beam1"), ct2(teacher, "beam5")),
    }


def main_rows(rows):
    """The rows the goals are read on: the teacher and every student trained
    for as many updates as the baseline (all rows without a baseline).

    A preset may give some rows a shorter budget (``row_updates``: ablations
    such as selective KD); those are compared among themselves in their own
    table (:func:`side_tables`), not with the baseline.
    """
    baseline = next((r for r in rows if r["name"] == "baseline"), None)
    if baseline is None:
        return list(rows)
    budget = baseline.get("train_updates")
    return [
        r for r in rows if r["name"] == "teacher" or r.get("train_updates") == budget
    ]


def side_tables(rows):
    """The students outside :func:`main_rows`, grouped by their update budget.

    Returns:
        ``[(updates, rows)]`` in the order the budgets first appear.
    """
    main = {id(r) for r in main_rows(rows)}
    groups = {}
    for r in rows:
        if id(r) not in main:
            groups.setdefault(r.get("train_updates"), []).append(r)
    return list(groups.items())


def best_on_valid(rows, beam="beam5"):
    """The row with the best valid BLEU at ``beam`` (None without rows)."""
    return max(rows, key=lambda r: _bleu(r, "valid", beam) or -1) if rows else None


def check_goals(rows, goals=None, curves=None, curve_spec=None):
    """The preset's goals, each with a verdict and the figures behind it.

    The best students are chosen on the valid set, never on test.

    Args:
        rows: the results' rows.
        goals: the preset's :class:`~kd_bench.preset.Goals` as a dict
            (``min_gain``, ``min_teacher_share``, ``min_speedup_fairseq``,
            ``min_speedup_ct2``, ``max_last_gain``; defaults for missing
            ones).
        curves: ``{row: {"points": [{"updates", "bleu"}]}}``, the valid
            curves (the protocol's stopping point is checked on the best
            student's; not checked without curves).
        curve_spec: the preset's curve settings (``rows``, ``every``, ``beam``).

    Returns:
        A list of ``{"goal", "met", "detail"}``.
    """
    from kd_bench.preset import Goals

    g = {**vars(Goals()), **(goals or {})}
    rows = main_rows(rows)
    by_name = {r["name"]: r for r in rows}
    teacher, baseline = by_name.get("teacher"), by_name.get("baseline")
    students = [r for r in rows if r["name"] != "teacher"]
    kd = [r for r in students if r["name"] != "baseline"]
    out = []
    if baseline and kd:
        losers = [r["name"] for r in kd if (_bleu(r) or 0) <= (_bleu(baseline) or 0)]
        out.append(
            {
                "goal": "G1: every KD student beats the baseline (BLEU, beam 5, test)",
                "met": not losers,
                "detail": "all do" if not losers else "not: " + ", ".join(losers),
            }
        )
        best = best_on_valid(kd)
        gain = (_bleu(best) or 0) - (_bleu(baseline) or 0)
        out.append(
            {
                "goal": "G2: the best KD student (chosen on valid) gains >= "
                f"+{g['min_gain']:g} BLEU (beam 5, test) over the baseline",
                "met": gain >= g["min_gain"],
                "detail": f"{best['name']}: {gain:+.2f}",
            }
        )
    if teacher and students:
        best = best_on_valid(students, "beam1")
        vs = against_teacher_beam5(best, teacher)
        share, fast, ct2 = (
            vs[k] or 0 for k in ("bleu_share", "speedup", "ct2_speedup")
        )
        out.append(
            {
                "goal": "G3: the best student (chosen on valid, greedy) decoded "
                f"greedily keeps >= {100 * g['min_teacher_share']:g}% of the "
                "teacher's beam-5 BLEU and translates >= "
                f"{g['min_speedup_fairseq']:g}x faster than the teacher's beam 5 "
                f"in fairseq and >= {g['min_speedup_ct2']:g}x in CTranslate2 int8",
                "met": share >= g["min_teacher_share"]
                and fast >= g["min_speedup_fairseq"]
                and ct2 >= g["min_speedup_ct2"],
                "detail": f"{best['name']}: {100 * share:.1f}% of the teacher's "
                f"beam-5 BLEU, {fast:.2f}x its speed in fairseq, {ct2:.2f}x in "
                "CTranslate2 int8",
            }
        )
    stopped = check_stopped(students, curves, curve_spec, g["max_last_gain"])
    if stopped:
        out.append(stopped)
    return out


def check_stopped(students, curves, spec, max_gain):
    """The protocol's stopping point: has the best student stopped rising?

    The best student on valid (beam 5) must have a curve, and its valid BLEU
    must gain less than ``max_gain`` over the curve's last interval.

    Returns:
        ``{"goal", "met", "detail"}``, or None without students or curves.
    """
    if not students or not spec or not curves:
        return None
    best = best_on_valid(students)
    goal = (
        "P: the best student (chosen on valid) has stopped rising: its valid "
        f"BLEU (beam {spec.get('beam', 5)}) gains < {max_gain:g} over the "
        "last interval of its curve"
    )
    points = (curves.get(best["name"]) or {}).get("points") or []
    if len(points) < 2:
        why = (
            f"the curve of {best['name']} has {len(points)} point(s)"
            if best["name"] in curves
            else f"the best student on valid is {best['name']}, the curves are "
            f"of {', '.join(curves)}"
        )
        return {"goal": goal, "met": False, "detail": f"not measured: {why}"}
    before, last = points[-2], points[-1]
    gain = last["bleu"] - before["bleu"]
    return {
        "goal": goal,
        "met": gain < max_gain,
        "detail": f"{best['name']}: {before['bleu']:.2f} at {before['updates']}, "
        f"{last['bleu']:.2f} at {last['updates']} updates ({gain:+.2f})",
    }


def summary_text(results):
    """Teacher, the student without KD and the KD student best on valid.

    The quickstart's printout: BLEU and chrF on test, sentences per second
    (fairseq) and the speed-up over the teacher, with beam 5 and greedy.

    Args:
        results: the dict of :func:`build_results` (multilingual: one block
            per direction).
    """
    if "directions" in results:
        return "\n\n".join(
            f"{pair}:\n" + summary_text(view) for pair, view in directions_of(results)
        )
    rows = main_rows(results["rows"])
    by_name = {r["name"]: r for r in rows}
    teacher = by_name.get("teacher")
    kd = [r for r in rows if r["name"] not in ("teacher", "baseline")]
    best = best_on_valid(kd)
    chosen = [
        ("teacher", teacher),
        ("student without KD", by_name.get("baseline")),
        (f"best KD on valid: {best['label']}" if best else "KD student", best),
    ]
    test = results.get("eval_sets", {}).get("test", "test")
    lines = [
        f"{test}: sacreBLEU / chrF, sentences/s (fairseq-generate, batch "
        f"{results.get('settings', {}).get('gen_batch_size', '?')}), speed-up "
        "over the teacher at the same beam",
        f"{'model':<56} {'beam':>4} {'BLEU':>6} {'chrF':>6} {'sent/s':>7} "
        f"{'speed-up':>8}",
    ]
    for label, r in chosen:
        if r is None:
            continue
        for beam in BEAMS:
            bleu = _get(r, "scores", "test", beam, "bleu")
            chrf = _get(r, "scores", "test", beam, "chrf")
            speed = _get(r, "speed", "test", beam)
            up = _get(r, "speedup", beam)
            cells = [
                "–" if v is None else fmt.format(v)
                for v, fmt in ((bleu, "{:.2f}"), (chrf, "{:.2f}"), (speed, "{:.0f}"))
            ]
            lines.append(
                f"{label[:56]:<56} {beam[4:]:>4} {cells[0]:>6} {cells[1]:>6} "
                f"{cells[2]:>7} {'–' if up is None else f'{up:.2f}x':>8}"
            )
    if best is not None and teacher is not None:
        vs = against_teacher_beam5(best, teacher)
        lines.append(
            f"{best['name']} greedy against the teacher's beam 5: "
            f"{100 * (vs['bleu_share'] or 0):.1f}% of its BLEU at "
            f"{vs['speedup'] or 0:.2f}x its speed"
        )
    return "\n".join(lines)


def _pair(row, *path, fmt="{:.1f}"):
    values = [_get(row, *path, beam) for beam in BEAMS]
    if isinstance(values[0], dict) or isinstance(values[1], dict):
        values = [v.get("sentences_per_second") if v else None for v in values]
    return " / ".join("–" if v is None else fmt.format(v) for v in values)


def _versus(vs):
    if not vs:
        return "–"
    share, fast, ct2 = vs.get("bleu_share"), vs.get("speedup"), vs.get("ct2_speedup")
    return (
        ("–" if share is None else f"{100 * share:.0f}%")
        + " / "
        + ("–" if fast is None else f"{fast:.2f}×")
        + ", "
        + ("–" if ct2 is None else f"{ct2:.2f}×")
    )


def _duration(seconds):
    if seconds is None:
        return "–"
    m = int(round(seconds / 60.0))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m} min"


def markdown_table(results, rows=None):
    """The results as one Markdown table (a row per model).

    Args:
        results: the dict of :func:`build_results`.
        rows: the rows to show (default: all of them).
    """
    sets = results.get("eval_sets", {"test": "test", "valid": "valid"})
    test, valid = sets.get("test", "test"), sets.get("valid", "valid")
    head = [
        "model",
        "params",
        "train time (updates)",
        f"BLEU {test} greedy / beam 5",
        f"chrF {test} greedy / beam 5",
        f"BLEU {valid} greedy / beam 5",
        "sent/s greedy / beam 5",
        "speed-up vs teacher",
        "CTranslate2 int8 sent/s",
        "greedy vs teacher beam 5: BLEU / speed-up fairseq, CT2",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results["rows"] if rows is None else rows:
        bleu = lambda split: " / ".join(  # noqa: E731
            "–" if v is None else f"{v:.2f}"
            for v in (_get(r, "scores", split, b, "bleu") for b in BEAMS)
        )
        chrf = " / ".join(
            "–" if v is None else f"{v:.1f}"
            for v in (_get(r, "scores", "test", b, "chrf") for b in BEAMS)
        )
        updates = r.get("train_updates")
        cells = [
            r.get("label", r["name"]),
            f"{r['params'] / 1e6:.1f}M" if r.get("params") else "–",
            _duration(r.get("train_seconds")) + (f" ({updates})" if updates else ""),
            bleu("test"),
            chrf,
            bleu("valid"),
            _pair(r, "speed", "test", fmt="{:.0f}"),
            _pair(r, "speedup", fmt="{:.2f}×"),
            _pair(r, "ct2_int8", fmt="{:.0f}") if r.get("ct2_int8") else "–",
            _versus(r.get("vs_teacher_beam5")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extract_reading(markdown):
    """The hand-written reading kept between the markers of a RESULTS.md."""
    if not markdown or READING_START not in markdown or READING_END not in markdown:
        return None
    inner = markdown.split(READING_START, 1)[1].split(READING_END, 1)[0]
    return inner.strip() or None


def teacher_setup(results):
    """The set-up lines of the subwords and the teacher (trained here or given)."""
    settings, subword = results.get("settings", {}), results.get("subword", "?")
    given = results.get("teacher_given")
    if not given:
        return [
            f"- subwords: {subword}, {settings.get('vocab', '?')} joint",
            f"- teacher: `{settings.get('teacher_arch', '')}`, "
            f"{json.dumps(settings.get('teacher_train', {}))}",
        ]
    row = next((r for r in results.get("rows", []) if r["name"] == "teacher"), {})
    sha = (row.get("given") or {}).get("sha256", "?")
    return [
        f"- subwords: {subword}, the teacher's own `{given['subword_model']}`",
        f"- teacher: given, not trained by this run: `{given['checkpoint']}` "
        f"(sha256 {sha}), its dictionaries from `{given['dict_dir']}` (the "
        "students use them too)",
    ]


def tables_section(results):
    """Markdown lines of one direction's tables: the rows the goals are read
    on, then the rows trained for a shorter budget."""
    out = [markdown_table(results, main_rows(results["rows"])), ""]
    for updates, rows in side_tables(results["rows"]):
        out += [
            f"Rows trained for {updates} updates only (a shorter budget, to "
            "compare KD variants among themselves; they are not in the "
            "goals):",
            "",
            markdown_table(results, rows),
            "",
        ]
    return out


def goals_lines(goals):
    """The goals' verdicts as Markdown list items."""
    return "\n".join(
        f"- {'met' if g['met'] else '**not met**'}: {g['goal']} ({g['detail']})"
        for g in goals
    )


def share_section(results):
    """Markdown lines: each student's share of the teacher, per direction."""
    pairs = ordered_pairs(results, results["directions"])
    first = results["directions"][pairs[0]]["rows"]
    test = results.get("eval_sets", {}).get("test", "test")
    out = [
        "## The student's share of the teacher, per direction",
        "",
        f"BLEU on {test} as a share of the teacher's beam-5 BLEU in the same "
        "direction, the student decoded greedily / with beam 5 (the teacher's "
        "row: its beam-5 BLEU).",
        "",
        "| model | " + " | ".join(pairs) + " |",
        "|" + " --- |" * (len(pairs) + 1),
    ]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for spec in first:
        name, cells = spec["name"], []
        for pair in pairs:
            found = results["directions"][pair]
            if name == "teacher":
                row = next((r for r in found["rows"] if r["name"] == name), None)
                bleu = _bleu(row) if row else None
                cells.append("–" if bleu is None else f"BLEU {bleu:.2f}")
                continue
            share = found.get("teacher_share", {}).get(name)
            cells.append(" / ".join(pct(share.get(b)) for b in BEAMS) if share else "–")
        out.append(f"| {spec.get('label', name)} | " + " | ".join(cells) + " |")
    return out + [""]


def render_markdown(results, reading=None, plot_name=OUTPUT_FILES["plot"]):
    """The whole RESULTS.md text.

    Args:
        results: the dict of :func:`build_results` (multilingual: one table
            and one list of goals per direction, and each student's share of
            the teacher per direction).
        reading: the hand-written reading to keep (placeholder when None).
        plot_name: the plot's file name beside RESULTS.md.
    """
    sets = results.get("eval_sets", {})
    machine = results.get("machine", {})
    settings = results.get("settings", {})
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    multilingual = "directions" in results
    views = directions_of(results)
    sig = results.get("signatures", {})
    out = [
        f"# {results.get('corpus', '')} {results.get('pair', '')}: "
        + ("multilingual " if multilingual else "")
        + f"knowledge distillation, {results.get('preset', '')} preset",
        "",
        "Reproduce from scratch (resumes where it stopped):",
        "",
        "```bash",
        results.get("command", ""),
        "```",
        "",
    ]
    if multilingual:
        out += [
            "One teacher, and one model per student row, serve every direction "
            f"({', '.join(ordered_pairs(results, results['directions']))}), "
            "trained with fairseq's "
            f"`{results.get('task', 'translation_multi_simple_epoch')}` (languages "
            f"{', '.join(results.get('langs', []))}, the source language's tag "
            "before each source, the target's forced as the first output token); "
            "each direction is translated and scored on its own.",
            "",
        ]
    for pair, view in views:
        out += ([f"## {pair}", ""] if pair else []) + tables_section(view)
    if multilingual:
        out += share_section(results)
    out += [
        f"BLEU and chrF: sacreBLEU on detokenised, cased output against the raw "
        f"references of {sets.get('test', 'test')} (test) and "
        f"{sets.get('valid', 'valid')} (valid). Speeds: sentences per second of "
        f"`fairseq-generate` on the {settings.get('gen_device', 'cpu').upper()}, "
        f"{sets.get('test', 'test')} (generation time as "
        f"fairseq reports it, model loading excluded), batch size "
        f"{settings.get('gen_batch_size', '?')} and at most "
        f"{settings.get('max_len_a', '?')} × source length + "
        f"{settings.get('max_len_b', '?')} target tokens for every model and "
        "engine (fairseq's `--max-len-a`/`--max-len-b`); speed-up = the "
        "model's speed over the teacher's at the same beam. CTranslate2: the "
        "same checkpoint converted with `ct2-fairseq-converter --quantization "
        "int8`"
        + (
            " (through `fairseq_kd.ct2_multilingual`, the direction's language "
            "tags given as fairseq gives them)"
            if multilingual
            else ""
        )
        + ", same sentences, batch size and length bound. The last column "
        "puts each student decoded greedily against the teacher's beam 5 "
        "(its share of the teacher's BLEU on test, its speed-up in fairseq and "
        "in CTranslate2 int8). Train time: wall time of "
        "`fairseq-train` for the number of updates shown. Best models are "
        "chosen on valid, never on test.",
        "",
        f"![BLEU against sentences per second]({plot_name})",
        "",
        "## Goals (checked automatically)",
        "",
    ]
    for pair, view in views:
        text = goals_lines(view.get("goals", [])) or "- (no goals could be checked)"
        out += ([f"{pair}:", ""] if pair else []) + [text, ""]
    out += [
        "## Reading",
        "",
        READING_START,
        reading or READING_PLACEHOLDER,
        READING_END,
        "",
        "## Set-up",
        "",
        f"- date: {results.get('date', '?')}",
        f"- machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores "
        f"({machine.get('torch_threads', '?')} torch threads), "
        f"{machine.get('platform', '?')}, Python {machine.get('python', '?')}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"- packages: {versions or '?'}",
        f"- sacreBLEU signature: `{sig.get('bleu')}`; chrF: `{sig.get('chrf')}`",
    ]
    out += teacher_setup(results)
    out += [
        f"- students (all rows): `{settings.get('student_arch', '')}`, "
        f"{json.dumps(settings.get('student_train', {}))}"
        + (
            f", update overrides {json.dumps(settings['row_updates'])}"
            if settings.get("row_updates")
            else ""
        ),
        f"- word-KD: alpha {settings.get('kd_alpha', '?')}, temperature "
        f"{settings.get('kd_temperature', '?')}, teacher top-"
        f"{settings.get('topk', '?')} (offline store and live alike)",
    ]
    for pair, view in views:
        out += curve_section(
            curves_of(view, settings), settings.get("curve"), pair, view["rows"]
        )
    out += seqkd_section(results.get("seqkd"))
    out += engines_section(results.get("seqkd_engines"))
    out += stages_section(results.get("stage_seconds"))
    if results.get("reference"):
        out += ["", "## Published numbers to compare with", "", results["reference"]]
    return "\n".join(out) + "\n"


def curve_section(curves, spec, pair=None, rows=()):
    """Markdown lines on valid BLEU at intermediate checkpoints (empty without).

    Args:
        curves: ``{row: {"points": [{"updates", "bleu", "chrf"}]}}``.
        spec: the preset's curve settings (``rows``, ``every``, ``beam``).
        pair: the direction (multilingual recipe), named in the title.
        rows: the results' rows (their labels head the columns, in table order).
    """
    curves = {row: c for row, c in (curves or {}).items() if c.get("points")}
    if not curves:
        return []
    spec = spec or {}
    labels = {r["name"]: r.get("label", r["name"]) for r in rows}
    order = [r["name"] for r in rows if r["name"] in curves]
    order += [row for row in curves if row not in order]
    stages = ", ".join(f"`curve:{row}`" for row in order)
    out = [
        "",
        "## Valid BLEU by training updates" + (f", {pair}" if pair else ""),
        "",
        f"A checkpoint every {spec.get('every', '?')} updates, decoded with beam "
        f"{spec.get('beam', '?')} on valid (stages {stages}); BLEU / chrF: the "
        "update budget is chosen on these curves, never on test.",
        "",
        "| updates | " + " | ".join(labels.get(row, row) for row in order) + " |",
        "| --- |" + " --- |" * len(order),
    ]
    by_row = {row: {p["updates"]: p for p in curves[row]["points"]} for row in order}
    for u in sorted({u for points in by_row.values() for u in points}):
        cells = [
            (
                f"{by_row[row][u]['bleu']:.2f} / {by_row[row][u]['chrf']:.1f}"
                if u in by_row[row]
                else "–"
            )
            for row in order
        ]
        out.append(f"| {u} | " + " | ".join(cells) + " |")
    return out


def seqkd_section(seqkd):
    """Markdown lines on the seq-KD corpora (empty without any).

    A multilingual corpus's summary holds its figures per direction
    (``directions``): one line per selection and direction then.

    Args:
        seqkd: ``{selection: distill summary subset}``.
    """
    if not seqkd:
        return []
    multilingual = any("directions" in s for s in seqkd.values())
    direction = "direction | " if multilingual else ""
    out = [
        "",
        "## Sequence-level KD corpora",
        "",
        "The teacher's beam search over the training split "
        "(`fairseq-kd-distill`); one n-best list per sentence serves both "
        "selections. Sentence-BLEU: sacreBLEU's, of the chosen hypothesis "
        "against the reference, averaged over sentences.",
        "",
        f"| selection | {direction}engine | sentences | sentences/s | degenerate "
        "(replaced by the reference) | not the teacher's best | mean "
        "sentence-BLEU chosen / teacher's best | corpus BLEU of the corpus |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
        + (" --- |" if multilingual else ""),
    ]
    for select, summary in seqkd.items():
        if multilingual:
            parts = [
                (f"{select} | {pair}", s)
                for pair, s in (summary.get("directions") or {}).items()
            ]
        else:
            parts = [(select, summary)]
        for head, s in parts:
            filtered = ", ".join(
                f"{k} {v}" for k, v in (s.get("filtered") or {}).items()
            )
            out.append(
                f"| {head} | {', '.join(s.get('engines') or [])} | "
                f"{s.get('sentences')} | {s.get('sentences_per_second')} | "
                f"{filtered} ({s.get('replaced')}) | {s.get('not_top')} | "
                f"{s.get('mean_sentence_bleu_chosen')} / "
                f"{s.get('mean_sentence_bleu_top')} | {s.get('corpus_bleu_chosen')} |"
            )
    return out


def engines_section(engines):
    """Markdown lines on fairseq's generator against CTranslate2 (empty without).

    Args:
        engines: what :func:`kd_bench.evaluate.compare_engines` wrote.
    """
    if not engines:
        return []
    n = engines["sentences"]
    first = engines["reference"]
    order = [first] + sorted(e for e in engines["engines"] if e != first)
    out = [
        "",
        f"The distillation engines side by side, the same teacher and beam search "
        f"over the first {n} sentences of train (`fairseq-kd-distill --engine`, "
        "stage `seqkd:engines`):",
        "",
        f"| engine | sentences/s | speed-up | distilled lines identical to {first}'s |",
        "| --- | --- | --- | --- |",
    ]
    for engine in order:
        e = engines["engines"][engine]
        out.append(
            f"| {engine} | {e['sentences_per_second']} | "
            f"{engines['speedup'][engine]:.2f}× | "
            f"{engines['identical_lines'][engine]} of {n} |"
        )
    return out


def stages_section(seconds):
    """Markdown lines on the wall time per stage (empty without stamps).

    Args:
        seconds: ``[[stage, seconds], ...]`` of the runs that made the
            outputs, in the order they finished.
    """
    if not seconds:
        return []
    total = sum(t for _, t in seconds)
    cells = ", ".join(
        f"{name} {t:.0f} s" if t < 90 else f"{name} {_duration(t)}"
        for name, t in seconds
    )
    return [
        "",
        "## Time per stage",
        "",
        f"Wall time of the run that made each stage's outputs (the `score` and "
        f"`table` stages excluded): {cells}; **total {_duration(total)}**.",
    ]


def plot(results, path):
    """BLEU (test) against sentences/s for every row, greedy and beam 5 (one
    panel per direction of the multilingual recipe).

    Args:
        results: the dict of :func:`build_results`.
        path: the PNG to write.
    """
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    views = directions_of(results)
    fig, axes = plt.subplots(
        1, len(views), figsize=(7.5 * len(views), 5), squeeze=False
    )
    labels = [plot_rows(ax, view) for ax, (_, view) in zip(axes[0], views)]
    fig.tight_layout()  # before the labels are placed in the final axes
    for ax, panel in zip(axes[0], labels):
        place_labels(ax, panel)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def spread_labels(positions, gap):
    """Label heights at least ``gap`` apart, each as near its point as can be.

    Labels are placed in the order of their points; a run of labels that
    would overlap is stacked ``gap`` apart and centred on its points (the
    least-squares placement of the run).

    Args:
        positions: each label's point (display units, any order).
        gap: the least distance between two labels (same units).

    Returns:
        The labels' positions, in the order of ``positions``.
    """
    groups = []  # [start, [indices in order]]
    for i in sorted(range(len(positions)), key=lambda k: positions[k]):
        groups.append([positions[i], [i]])
        while len(groups) > 1:
            (start_a, members_a), (start_b, members_b) = groups[-2], groups[-1]
            if start_a + len(members_a) * gap <= start_b:
                break
            members = members_a + members_b
            start = sum(positions[m] - j * gap for j, m in enumerate(members))
            groups[-2:] = [[start / len(members), members]]
    placed = [0.0] * len(positions)
    for start, members in groups:
        for j, m in enumerate(members):
            placed[m] = start + j * gap
    return placed


def place_labels(ax, labels, fontsize=7):
    """Each row's label beside its beam-5 point; labels that would overlap
    are moved apart vertically (:func:`spread_labels`), with a thin line to
    their point.

    Args:
        ax: the panel, laid out (its size is final).
        labels: ``(text, (x, y), color)`` per row (:func:`plot_rows`).
        fontsize: the labels' size in points.
    """
    ax.get_xlim(), ax.get_ylim()  # the limits autoscaled, not pending
    # in points (1/72 inch) from the figure's bottom: 1.4 lines apart at least
    to_points = 72.0 / ax.figure.dpi
    heights = [ax.transData.transform(p)[1] * to_points for _, p, _ in labels]
    placed = spread_labels(heights, 1.4 * fontsize)
    for (text, point, color), height, new_height in zip(labels, heights, placed):
        moved = abs(new_height - height) > 0.5
        line = dict(arrowstyle="-", color=color, linewidth=0.5, alpha=0.6)
        ax.annotate(
            text,
            point,
            textcoords="offset points",
            xytext=(5, new_height - height + 3),
            fontsize=fontsize,
            color=color,
            arrowprops=line if moved else None,
            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7),
        )


def plot_rows(ax, results):
    """One panel of :func:`plot`: the rows of one direction.

    Returns:
        ``(label, (x, y), color)`` of each row, for :func:`place_labels`.
    """
    from matplotlib.ticker import ScalarFormatter

    markers = {"beam1": "o", "beam5": "s"}
    labels = []  # (text, point, color)
    for i, row in enumerate(results["rows"]):
        color = f"C{i % 10}"
        xs, ys = [], []
        for beam in BEAMS:
            x = _get(row, "speed", "test", beam)
            y = _get(row, "scores", "test", beam, "bleu")
            if x is None or y is None:
                continue
            xs.append(x)
            ys.append(y)
            ax.scatter([x], [y], color=color, marker=markers[beam], zorder=3)
        if xs:
            ax.plot(xs, ys, color=color, linewidth=1, alpha=0.6)
            labels.append((row.get("label", row["name"]), (xs[-1], ys[-1]), color))
    ax.set_xscale("log")
    for axis in (ax.xaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    device = results.get("settings", {}).get("gen_device", "cpu").upper()
    ax.set_xlabel(f"sentences / s (fairseq-generate, {device}, log scale)")
    ax.set_ylabel(f"BLEU, {results.get('eval_sets', {}).get('test', 'test')}")
    ax.set_title(
        f"{results.get('corpus', '')} {results.get('pair', '')}, "
        f"{results.get('preset', '')} preset: circles greedy, squares beam 5",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    return labels


def write_results(scores, meta, paths, existing_md=None):
    """Write results.json, RESULTS.md and the plot.

    Args:
        scores: the ``score`` stage's JSON.
        meta: the recipe's description.
        paths: ``{"json", "markdown", "plot"}`` -> where to write each.
        existing_md: a RESULTS.md whose hand-written reading is kept.
    """
    results = build_results(scores, meta)
    reading = None
    if existing_md and os.path.exists(existing_md):
        reading = extract_reading(open(existing_md, encoding="utf-8").read())
    for path in paths.values():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json(paths["json"], results)
    with atomic_write(paths["markdown"]) as f:
        f.write(
            render_markdown(
                results,
                reading,
                os.path.basename(paths["plot"]).replace(".partial", ""),
            )
        )
    plot(results, paths["plot"])
    return results

"""The Markdown table of runs' results (``results.md``)."""

from __future__ import annotations


def results_table(results: list[dict]) -> str:
    """A markdown table of runs' results."""
    lines = [
        "| modality | audio rate | video rate | decor λ | WER % | CER % | chance WER % | WER swapped video % "
        "| WER swapped audio % | recorded speech WER % | untrained WER % | WER % by SNR (dB) | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.get("training", {"steps": "–", "train_seconds": "–"})  # --eval_only: no training
        lines.append(
            f"| {r['modality']} | {r['audio_rate'] or '–'} | {r['video_rate'] or '–'} | {r['decor_weight']} | "
            f"{r['test']['wer']:.2f} | {r['test']['cer']:.2f} | {_cell(r.get('chance', {}).get('wer'))} | "
            f"{_cell(r.get('wer_swap_video'))} | {_cell(r.get('wer_swap_audio'))} | "
            f"{_cell(r.get('real_speech', {}).get('wer'))} | {r.get('untrained', {}).get('wer', float('nan')):.2f} | "
            f"{_snr_cell(r)} | {t['steps']} | {t['train_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def _snr_cell(result: dict) -> str:
    by_snr = result.get("test_by_snr", {}).get("snr_db", {})
    return ", ".join(f"{snr}: {v['wer']:.2f}" for snr, v in by_snr.items()) or "–"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"

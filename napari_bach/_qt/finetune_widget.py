"""The "Fine-tune on corrections" dock widget: teach the model from exported corrections.

Training runs in a separate process (``python -m src_train finetune``, through Qt's
QProcess): the viewer stays responsive, and a crash of the training cannot take napari
down. The process reports JSON lines (progress, loss, the before/after table); Cancel
ends it, leaving the run's last checkpoint. The new model goes only into the folder the
user chose; one click makes it *Segment nuclei*'s model, after a question when it did not
beat the starting model on the held-out corrections. The shipped model is never written to.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton

from .common import ModelPicker, recent, row, scrolling, wrap

if TYPE_CHECKING:
    import napari

BUDGETS = {"5 min": 5.0, "15 min": 15.0, "45 min": 45.0}
def finetune_command(dataset: str, model: str, minutes: float, out: str, device: str,
                     replay: Path | None = None) -> list[str]:
    """The command the widget runs, the same as a user types (plus JSON progress)."""
    return [sys.executable, "-m", "src_train", "finetune", dataset, "--model", model, "--minutes", f"{minutes:g}",
            "--out", out, "--device", device, "--progress-json", *(["--replay", str(replay)] if replay else ["--no-replay"])]


class FinetuneWidget(Container):
    """Fine-tune the chosen model on an exported dataset, with before/after numbers."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        self._dataset = FileEdit(label="Dataset folder", mode="d", value=recent.get("dataset") or "")
        self.model = ModelPicker()
        self._budget = ComboBox(label="Time budget", choices=list(BUDGETS), value="5 min")
        self._out = FileEdit(label="Save models in", mode="d")
        from src_train.finetune import default_replay

        self._replay_list = default_replay()
        self._replay = CheckBox(text="replay the original training data (keeps other tissue)",
                                value=self._replay_list is not None, enabled=self._replay_list is not None,
                                tooltip=str(self._replay_list or "needs a source checkout with ../shared/data beside it"))
        self._run = PushButton(text="Fine-tune")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self._status = Label(label="Status", value="Export corrected images with Correct, export & report, "
                                                   "then fine-tune on them here.")
        self._table = Label(label="Held out", value="")
        from qtpy.QtCore import Qt

        self._table.native.setTextFormat(Qt.TextFormat.RichText)  # an HTML table: columns align in any font
        self._use = PushButton(text="Use in Segment nuclei", enabled=False)
        for label in (self._status, self._table):
            wrap(label)
        self.extend([self._dataset, *self.model.widgets, self._budget, self._out, self._replay,
                     row(self._run, self._cancel),
                     self._progress, self._status, self._table, self._use])
        scrolling(self)
        self._run.changed.connect(lambda *_: self.run())
        self._cancel.changed.connect(lambda *_: self.cancel())
        self._use.changed.connect(lambda *_: self.use_model())
        self.process = None
        self.result: dict | None = None
        self._buffer = ""
        self._cancelled = False
        self.native.destroyed.connect(lambda *_: self._kill())

    # -- running -------------------------------------------------------------------------
    def run(self) -> None:
        dataset, out = str(self._dataset.value), str(self._out.value)
        if not dataset or dataset == "." or not (Path(dataset) / "manifest.json").is_file():
            self._status.value = ("Choose a dataset folder written by Correct, export & report "
                                  "(it holds manifest.json).")
            return
        if not out or out == ".":
            self._status.value = "Choose a folder to save the fine-tuned model in (the shipped model is never replaced)."
            return
        from qtpy.QtCore import QProcess

        self.result, self._buffer, self._cancelled = None, "", False
        self._table.value = ""
        self._use.enabled = False
        process = QProcess(self.native)
        command = finetune_command(dataset, str(self.model.path()), BUDGETS[self._budget.value], out,
                                   self.model.device.value, self._replay_list if self._replay.value else None)
        process.setProgram(command[0])
        process.setArguments(command[1:])
        process.readyReadStandardOutput.connect(self._read)
        process.finished.connect(self._finished)
        self.process = process
        self._run.enabled, self._cancel.enabled = False, True
        self._progress.value = 0
        self._status.value = "Starting the training process…"
        process.start()

    def cancel(self) -> None:
        if self.process is not None:
            self._cancelled = True
            self._status.value = "Cancelling…"
            self.process.kill()

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.waitForFinished(5000)

    def _read(self, process=None) -> None:
        process = process or self.process
        self._buffer += bytes(process.readAllStandardOutput()).decode(errors="replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._on_event(event)

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "phase":
            self._status.value = event["message"].capitalize() + "…"
        elif kind == "step":
            self._progress.value = min(100, int(100 * event["elapsed_s"] / max(event["total_s"], 1e-9)))
            left = max(0.0, event["total_s"] - event["elapsed_s"])
            self._status.value = f"step {event['step']}: loss {event['loss']:.3f}, about {left / 60:.1f} min left"
        elif kind == "done":
            self.result = event
            self._progress.value = 100
            self._table.value = table_text(event)

    def _finished(self, code: int, *_) -> None:
        process, self.process = self.process, None
        self._read(process)  # what it printed last
        self._buffer += "\n"
        self._read(process)
        self._run.enabled, self._cancel.enabled = True, False
        err = bytes(process.readAllStandardError()).decode(errors="replace").strip() if process is not None else ""
        if self._cancelled:
            run = next(Path(str(self._out.value)).glob("*-run/last.pt"), None)
            self._status.value = ("Cancelled; nothing you exported was changed."
                                  + (f" The run's last checkpoint: {run}" if run else ""))
        elif code != 0 or self.result is None:
            message = [l for l in err.splitlines() if l.startswith("error:")]
            self._status.value = "Fine-tuning failed: " + (message[-1][6:].strip() if message else
                                                           (err.splitlines()[-1] if err else f"exit code {code}"))
        elif self.result["better"]:
            self._status.value = f"Better on the held-out corrections. Saved {Path(self.result['model']).name}"
            self._use.enabled = True
        else:
            self._status.value = (f"Not better than the starting model on the held-out corrections: keep using "
                                  f"{Path(self.result['start_model']).name}. The fine-tuned model is saved as "
                                  f"{Path(self.result['model']).name}; export more corrected images and try again.")
            self._use.enabled = True  # asks first

    def _confirm_not_better(self) -> bool:
        from qtpy.QtWidgets import QMessageBox

        box = QMessageBox(QMessageBox.Icon.Warning, "Use a model that is not better?",
                          "On the held-out corrections the fine-tuned model did not beat the starting model "
                          f"({Path(self.result['start_model']).name}). Use it in Segment nuclei anyway?",
                          parent=self.native)
        use = box.addButton("Use it anyway", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton("Keep the starting model", QMessageBox.ButtonRole.RejectRole)
        box.exec()
        return box.clickedButton() is use

    def use_model(self) -> None:
        """Make the fine-tuned model *Segment nuclei*'s model (opening that dock if needed);
        one that is not better is used only when the user says so."""
        if self.result is None:
            return
        if not self.result["better"] and not self._confirm_not_better():
            self._status.value = f"Kept {Path(self.result['start_model']).name} in Segment nuclei"
            return
        _, segment = self._viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
        segment.model.use_file(self.result["model"])
        self._status.value = f"Segment nuclei now uses {Path(self.result['model']).name}"


def table_text(result: dict) -> str:
    """Before/after on the held-out corrections as an HTML table (aligned in any font); the
    thresholds on a line under it, which a narrow dock keeps whole."""
    keys = (("F1@0.5", "f1"), ("AJI", "aji"), ("PQ", "pq"))
    cell = '<td align="right">&nbsp;{}&nbsp;</td>'
    (t0, t1), (m0, m1) = result["score_threshold"], result["mask_threshold"]

    def line(name: str, values) -> str:
        return f"<tr><td>{name}</td>" + "".join(cell.format(v) for v in values) + "</tr>"

    rows = [line("", [name for name, _ in keys]),
            line("before", [f"{result['before'][k]:.3f}" for _, k in keys]),
            line("after", [f"{result['after'][k]:.3f}" for _, k in keys]),
            line("change", [f"{result['after'][k] - result['before'][k]:+.3f}" for _, k in keys])]
    thresholds = f"score / mask threshold {t0:g} / {m0:g} → {t1:g} / {m1:g}<br>"
    verdict = "better" if result["better"] else "<b>not better</b>"
    images = ", ".join(result["held_out_images"])
    from src_train.finetune import zoom_phrase

    zoom = zoom_phrase(*result.get("mpp", (0, 0)))  # finetune.lab_mpp: the corrections' nucleus size
    scale = f"; {zoom}" if zoom else ""
    return (f"{len(result['held_out_images'])} held-out image(s): {images}<table cellspacing='0'>{''.join(rows)}"
            f"</table>{thresholds}{verdict}: weights of step {result['chosen_step']} of {result['steps']} "
            f"({result['minutes']:g} min){scale}")

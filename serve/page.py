"""The upload page the service shows at `/`: pick an image, see the prediction and the feature maps over it.

The page posts the file as the body of `POST /explain/{model}?maps=true&html=true` and shows the card the service
returns, which is `export.predict.card`: the same overlay PNG, class table and contribution table as a card of
predict.py's predictions.html, with the same style sheet. No external script, style or font: it works offline.
"""

from __future__ import annotations

import html
import json

from export.predict import CONTRIBUTION_NOTE, PAGE_CSS

_SCRIPT = """
const form = document.getElementById('upload');
const status = document.getElementById('status');
const result = document.getElementById('result');
async function send(file) {
  status.className = 'muted';
  status.textContent = 'Predicting ' + file.name + ' ...';
  const url = EXPLAIN + '?maps=true&html=true&top_k=' + document.getElementById('top_k').value
              + '&filename=' + encodeURIComponent(file.name);
  try {
    const reply = await fetch(url, {method: 'POST', body: file,
                                    headers: {'content-type': file.type || 'application/octet-stream'}});
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error || reply.statusText);
    result.innerHTML = body.html;
    status.textContent = file.name + ': ' + body.predicted_name + ' (p = ' + body.probability.toFixed(3) + ')';
    status.dataset.done = String(Number(status.dataset.done || 0) + 1);
  } catch (e) {
    status.className = 'failed';
    status.textContent = 'Could not predict ' + file.name + ': ' + e.message;
    status.dataset.failed = String(Number(status.dataset.failed || 0) + 1);
  }
}
document.getElementById('file').addEventListener('change', function (ev) {
  if (ev.target.files.length) send(ev.target.files[0]);
});
form.addEventListener('submit', function (ev) { ev.preventDefault(); });
"""


def upload_page(name: str, classes: list[str], image_size: list[int], provider: str) -> str:
    """The page for model `name` (its class names and input size are shown so a person knows what to upload)."""
    esc = html.escape
    explain = json.dumps(f"/explain/{name}").replace("</", "<\\/")  # a name cannot close the script
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>DINO-QPM: {esc(name)}</title><style>{PAGE_CSS}</style></head><body>\n"
            f"<h1>DINO-QPM: {esc(name)}</h1>"
            f'<p class="muted">Classes: {esc(", ".join(classes))}. Images are resized to {image_size[0]}x'
            f"{image_size[1]}; {esc(provider)}. {CONTRIBUTION_NOTE}</p>"
            '<form id="upload" class="card"><label>Image: <input type="file" id="file" accept="image/*"></label> '
            '<label>classes listed: <input type="number" id="top_k" value="5" min="1" max="50" style="width:4em">'
            '</label></form>'
            '<p id="status" class="muted">Choose an image file.</p><div id="result"></div>'
            f"<script>const EXPLAIN = {explain};{_SCRIPT}</script>\n</body></html>\n")

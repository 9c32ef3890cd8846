"""The playground: `GET /` on the API, a page to try each served model in a browser.

One form per model with the inputs its task takes (its images as uploads, prompt, seed, steps,
guidance, the model's detectors); each image chosen is shown, and before generating, the control
maps the pipeline will get (`/v1/control-maps/upload`: the model's `control`, or the detector
chosen, run in the engine). The form then calls the API's own `/v1/generate/upload` route (the
page adds nothing the API does not do) and shows the image with the parameters the server
resolved, or the API's error; a model starting a replica (503 with Retry-After) is asked again
after the seconds it names. With an API key set, the page asks for it and sends it as the API
wants it (Bearer); the page itself holds no secret.
Everything is inline: no external script, style or font.

A link can fill a form and run it: `/?model=NAME&prompt=...&seed=7&run=1`; images not chosen
are then a drawn sample (a white disc on black), as "use a sample image" does.
"""

from __future__ import annotations

import html

from pixfleet.config.serving import ServingConfig
from pixfleet.models.tasks import task_info

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 72em; }
section { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1em 0; }
label { display: inline-block; margin: 0.3em 1em 0.3em 0; }
.inputs img, .result img { max-width: 256px; margin: 0.3em; border: 1px solid #ddd; }
.error { color: #a00; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }
"""

_SCRIPT = """
const base = location.pathname.replace(/\\/$/, "");
const query = new URLSearchParams(location.search);

function sample() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const pen = canvas.getContext("2d");
  pen.fillStyle = "black"; pen.fillRect(0, 0, 64, 64);
  pen.fillStyle = "white"; pen.beginPath(); pen.arc(32, 32, 18, 0, 2 * Math.PI); pen.fill();
  return new Promise(done => canvas.toBlob(done, "image/png"));
}

function show(section, field, blob) {
  let img = section.querySelector(`.inputs img[data-field="${field}"]`);
  if (!img) {
    img = document.createElement("img");
    img.dataset.field = field;
    img.title = field;
    section.querySelector(".inputs").appendChild(img);
  }
  img.src = URL.createObjectURL(blob);
}

async function images(section) {
  const chosen = {};
  for (const input of section.querySelectorAll("input[type=file]")) {
    chosen[input.name] = input.files[0] || section.samples?.[input.name];
    if (!chosen[input.name]) {
      chosen[input.name] = await sample();
      show(section, input.name, chosen[input.name]);
    }
  }
  return chosen;
}

function post(route, params, chosen, controlOnly) {
  const body = new FormData();
  body.append("params", JSON.stringify(params));
  for (const [field, blob] of Object.entries(chosen)) {
    if (controlOnly && !field.startsWith("control_images")) continue;
    body.append(field.replace(/\\[\\d+\\]$/, ""), blob, field + ".png");
  }
  const headers = {};
  const key = document.getElementById("key");
  if (key && key.value) headers.Authorization = "Bearer " + key.value;
  return fetch(base + route, { method: "POST", body, headers });
}

async function showMaps(section, params, chosen) {
  // The maps the pipeline will get, shown before it runs: the model's control, or the detector.
  const asked = { model: params.model };
  for (const name of ["detector", "width", "height"]) if (name in params) asked[name] = params[name];
  const response = await post("/v1/control-maps/upload", asked, chosen, true);
  if (!response.ok) return;
  const answer = await response.json();
  answer.data.forEach((item, i) => {
    const bytes = Uint8Array.from(atob(item.b64_json), c => c.charCodeAt(0));
    show(section, `control map ${i}`, new Blob([bytes], { type: "image/png" }));
  });
}

async function generate(section) {
  const form = section.querySelector("form");
  const result = section.querySelector(".result");
  const params = { model: section.dataset.model };
  for (const input of form.querySelectorAll("[data-param]")) {
    if (input.value === "") continue;
    params[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  const chosen = await images(section);
  if (Number(section.dataset.controlnets) > 0) await showMaps(section, params, chosen);
  result.textContent = "generating...";
  let response = await post("/v1/generate/upload", params, chosen, false);
  // A model scaled to zero answers 503 with Retry-After while its replica starts: wait and ask
  // again, for ten minutes at most.
  let waited = 0;
  while (response.status === 503 && response.headers.has("Retry-After") && waited < 600) {
    const seconds = Number(response.headers.get("Retry-After"));
    result.textContent = `the model is starting a replica; asking again in ${seconds} s...`;
    await new Promise(resolve => setTimeout(resolve, seconds * 1000));
    waited += seconds;
    response = await post("/v1/generate/upload", params, chosen, false);
  }
  const answer = await response.json();
  result.dataset.status = response.status;
  result.dataset.waited = waited;
  result.textContent = "";
  if (!response.ok) {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = `${response.status}: ${answer.error ? answer.error.message : JSON.stringify(answer)}`;
    result.appendChild(error);
    return;
  }
  for (const item of answer.data) {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.b64_json;
    img.title = "seed " + item.seed;
    result.appendChild(img);
  }
  const shown = document.createElement("pre");
  shown.textContent = JSON.stringify({ model: answer.model, ...answer.parameters }, null, 1);
  result.appendChild(shown);
}

for (const section of document.querySelectorAll("section[data-model]")) {
  const form = section.querySelector("form");
  form.addEventListener("submit", event => { event.preventDefault(); generate(section); });
  for (const input of section.querySelectorAll("input[type=file]")) {
    input.addEventListener("change", () => input.files[0] && show(section, input.name, input.files[0]));
  }
  section.querySelector(".sample").addEventListener("click", async () => {
    section.samples = {};
    for (const input of section.querySelectorAll("input[type=file]")) {
      section.samples[input.name] = await sample();
      show(section, input.name, section.samples[input.name]);
    }
  });
  if (query.get("model") === section.dataset.model) {
    for (const [name, value] of query) {
      const input = form.querySelector(`[data-param][name="${name}"]`);
      if (input) input.value = value;
    }
    if (query.get("run") === "1") generate(section);
  }
}
"""


def _image_fields(task: str, num_controlnets: int) -> list[tuple[str, str]]:
    """(form field, label) of each image the task takes, as the upload route names them."""
    info = task_info(task)
    fields = [("image", "source image")] if info.needs_source_image else []
    fields += [(f"control_images[{i}]", f"control image {i}") for i in range(num_controlnets)]
    return fields + ([("mask_image", "mask (white = repaint)")] if info.needs_mask else [])


def _number(name: str, label: str, step: str = "1") -> str:
    return f'<label>{label} <input type="number" name="{name}" step="{step}" data-param></label>'


def playground_page(config: ServingConfig, needs_key: bool) -> str:
    """The page's HTML for the served models."""
    sections = []
    for served in config.models:
        task = served.model.task
        info = task_info(task)
        images = "".join(
            f'<label>{label} <input type="file" name="{field}" accept="image/*"></label>'
            for field, label in _image_fields(task, served.model.num_controlnets)
        )
        detectors = ""
        if served.detectors:
            options = "".join(f'<option value="{d.detector}">{d.detector}</option>' for d in served.detectors)
            select = f'<select name="detector" data-param><option value="">none</option>{options}</select>'
            detectors = f"<label>detector {select}</label>"
        edits = info.needs_source_image and not info.uses_controlnet  # InstructPix2Pix
        guidance = _number("image_guidance_scale", "image guidance", "0.1") if edits else ""
        name = html.escape(served.name)
        sections.append(
            f'<section data-model="{name}" data-controlnets="{served.model.num_controlnets}">'
            f"<h2>{name} <small>{task}</small></h2>"
            f"<form>{images}<br>"
            '<label>prompt <input name="prompt" size="60" data-param></label><br>'
            f"{_number('seed', 'seed')}{_number('num_inference_steps', 'steps')}"
            f"{_number('guidance_scale', 'guidance', '0.5')}{guidance}{detectors}<br>"
            '<button type="submit">Generate</button> <button type="button" class="sample">use a sample image</button>'
            '</form><div class="inputs"></div><div class="result"></div></section>'
        )
    key = '<p><label>API key <input id="key" type="password" autocomplete="off"></label></p>' if needs_key else ""
    names = html.escape(", ".join(m.name for m in config.models))
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>pixfleet: {html.escape(config.name)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>pixfleet playground</h1>"
        f"<p>Models: {names}. Each form calls this API's <code>/v1/generate/upload</code>.</p>"
        f"{key}{''.join(sections)}<script>{_SCRIPT}</script></body></html>"
    )

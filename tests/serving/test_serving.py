"""The HTTP API over real HTTP on 127.0.0.1: endpoints, faithfulness, batching, overload,
timeouts, API key, bad input, and ControlNets from the MLflow registry."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.helpers import direct_call, png_bytes, random_image, register_controlnet
from tests.serving.conftest import API_KEY, REGISTERED

pytestmark = pytest.mark.timeout(300)


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def decoded(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def controlnet_request(image_seed: int, **fields) -> dict:
    """A request whose control image is seeded noise (`random_image(image_seed)`)."""
    control = b64(random_image(image_seed))
    return {"model": "tiny-controlnet", "prompt": "a circle", "control_images": [control], **fields}


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Replicas compute with their own thread count: equal up to float reduction order."""
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_models_and_health(server):
    with server.client("/main") as client:
        models = client.get("/v1/models").json()
        health = client.get("/healthz")
        docs = client.get("/openapi.json")
    assert [m["id"] for m in models["data"]] == ["tiny-controlnet", "tiny-pix2pix"]
    assert models["data"][0]["multiplexed_controlnets"] == [REGISTERED]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["models"]) == {"tiny-controlnet", "tiny-pix2pix"}
    assert "/v1/images/edits" in docs.json()["paths"]


def test_generation_equals_a_direct_diffusers_call(server, tiny_dir):
    """The bulk job equals the same direct call (test_stages), so server and job agree too."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    with server.client("/main") as client:
        response = client.post("/v1/generate", json=controlnet_request(0, seed=7, num_images_per_prompt=2))
        png = client.post("/v1/generate", json=controlnet_request(0, seed=7, response_format="png"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [7, 8]
    assert body["parameters"]["num_inference_steps"] == 2 and body["parameters"]["seed"] == 7

    controlnet = ControlNetModel.from_pretrained(tiny_dir / "controlnet" / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir / "controlnet", controlnet=controlnet)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = direct_call(pipe, "controlnet", ["a circle"] * 2, [7, 8], controls=[random_image(0)] * 2)
    for item, reference in zip(body["data"], expected, strict=True):
        assert_close(decoded(item), reference)
    assert png.headers["content-type"] == "image/png" and png.headers["x-pixfleet-seed"] == "7"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), decoded(body["data"][0]))


def test_multipart_upload_gives_the_json_result(server):
    control = png_bytes(random_image(1))
    with server.client("/main") as client:
        upload = client.post(
            "/v1/generate/upload",
            data={"params": '{"model": "tiny-controlnet", "prompt": "a circle", "seed": 3}'},
            files={"control_images": ("edges.png", control, "image/png")},
        )
        as_json = client.post("/v1/generate", json=controlnet_request(1, seed=3))
    assert upload.status_code == 200, upload.text
    np.testing.assert_array_equal(decoded(upload.json()["data"][0]), decoded(as_json.json()["data"][0]))


def test_openai_client_edits_with_pix2pix(server, tiny_dir):
    import openai
    from diffusers import StableDiffusionInstructPix2PixPipeline

    client = openai.OpenAI(base_url=f"{server.url}/main/v1", api_key="unused", max_retries=0)
    result = client.images.edit(
        model="tiny-pix2pix",
        image=("photo.png", png_bytes(random_image(5)), "image/png"),
        prompt="make it blue",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11, "image_guidance_scale": 1.5},
    )
    assert len(result.data) == 2
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir / "pix2pix")
    pipe.set_progress_bar_config(disable=True)
    expected = direct_call(
        pipe, "pix2pix", ["make it blue"] * 2, [11, 12], sources=[random_image(5)] * 2, image_guidance_scale=1.5
    )
    for item, reference in zip(result.data, expected, strict=True):
        assert_close(decoded({"b64_json": item.b64_json}), reference)

    with pytest.raises(openai.UnprocessableEntityError, match="does not edit"):
        client.images.edit(
            model="tiny-controlnet", image=("a.png", png_bytes(random_image(5)), "image/png"), prompt="x"
        )


def test_parallel_requests_all_succeed_and_share_batches(server):
    seeds = list(range(100, 108))
    with server.client("/main") as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: client.post("/v1/generate", json=controlnet_request(s, seed=s)), seeds))
        alone = client.post("/v1/generate", json=controlnet_request(seeds[-1], seed=seeds[-1]))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    batch_sizes = [r.json()["batch_size"] for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    assert alone.json()["batch_size"] == 1
    # A request's image does not depend on the batch it shared.
    assert_close(decoded(responses[-1].json()["data"][0]), decoded(alone.json()["data"][0]))


def bomb_png() -> bytes:
    """A 20000 x 20000 image compressed to a few KB."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "invalid base64": (controlnet_request(0, control_images=["not base64!"]), 400, "control_images[0]"),
    "not an image": (
        controlnet_request(0, control_images=[base64.b64encode(b"hello").decode()]),
        400,
        "control_images[0]",
    ),
    "over the pixel limit": (controlnet_request(0, control_images=[b64(random_image(0, (256, 256)))]), 413, None),
    "decompression bomb": (
        controlnet_request(0, control_images=[base64.b64encode(bomb_png()).decode()]),
        413,
        "control_images[0]",
    ),
    "wrong type": (controlnet_request(0, num_inference_steps="many"), 422, "num_inference_steps"),
    "out of range": (controlnet_request(0, guidance_scale=-1), 422, "guidance_scale"),
    "too many images": (controlnet_request(0, num_images_per_prompt=5), 422, "num_images_per_prompt"),
    "unknown field": (controlnet_request(0, stepz=3), 422, "stepz"),
    "missing control image": ({"model": "tiny-controlnet", "prompt": "x"}, 422, "control_images[0]"),
    "unknown model": ({**controlnet_request(0), "model": "nope"}, 404, "model"),
    "unknown registered controlnet": (controlnet_request(0, controlnet="other@champion"), 404, "controlnet"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda c: c.replace(" ", "-"))
def test_bad_input_gets_a_clear_4xx_and_the_server_goes_on(server, case):
    body, status, param = BAD_REQUESTS[case]
    with server.client("/main") as client:
        response = client.post("/v1/generate", json=body)
        good = client.post("/v1/generate", json=controlnet_request(0, seed=1))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == (param or error["param"])
    assert good.status_code == 200


def test_a_50_mb_body_is_refused_unread(server):
    import psutil

    def serve_rss() -> int:
        names = ("ServeReplica:main:ingress", "ProxyActor")
        processes = [
            p for p in psutil.process_iter(["cmdline"]) if any(n in " ".join(p.info["cmdline"] or []) for n in names)
        ]
        return sum(p.memory_info().rss for p in processes)

    before = serve_rss()
    with server.client("/main") as client:
        response = client.post("/v1/generate", content=b"x" * 50 * 2**20, headers={"content-type": "application/json"})
        good = client.post("/v1/generate", json=controlnet_request(0, seed=1))
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]
    assert good.status_code == 200
    assert serve_rss() - before < 25 * 2**20


def test_overload_answers_503_quickly(server):
    """One slot and a queue of one: of 6 slow requests at once, some are turned away at once."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    slow = controlnet_request(0, num_inference_steps=50, seed=1)
    with server.client("/tight", headers=headers) as client, ThreadPoolExecutor(6) as pool:

        def timed_post(_):
            start = time.perf_counter()
            response = client.post("/v1/generate", json=slow)
            return response.status_code, time.perf_counter() - start

        results = list(pool.map(timed_post, range(6)))
    refused = [seconds for status, seconds in results if status == 503]
    served = [seconds for status, seconds in results if status == 200]
    assert refused and served and len(refused) + len(served) == 6, results
    # Turned away at once, not after waiting in a queue behind the slow ones.
    assert max(refused) < min(served), results


def test_timeout_answers_504_and_frees_the_replica(server):
    headers = {"authorization": f"Bearer {API_KEY}"}
    with server.client("/tight", headers=headers) as client:
        late = client.post("/v1/generate", json=controlnet_request(0, num_inference_steps=1000))
        after = client.post("/v1/generate", json=controlnet_request(0, seed=1))
    assert late.status_code == 504 and "timed out" in late.json()["error"]["message"]
    # 1000 steps take far longer than the 3 s timeout: a 200 now means the single-slot
    # replica stopped denoising at the deadline instead of finishing the abandoned request.
    assert after.status_code == 200


def test_a_request_never_asks_for_more_images_than_a_batch_holds(server):
    headers = {"authorization": f"Bearer {API_KEY}"}
    with server.client("/tight", headers=headers) as client:  # max_batch_size 1
        response = client.post("/v1/generate", json=controlnet_request(0, num_images_per_prompt=2))
        not_json = client.post("/v1/generate", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "at most 1 per request" in response.json()["error"]["message"]
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"


def test_api_key_is_required_when_configured(server):
    with server.client("/tight") as client:
        missing = client.post("/v1/generate", json=controlnet_request(0))
        wrong = client.post("/v1/generate", json=controlnet_request(0), headers={"authorization": "Bearer nope"})
        health = client.get("/healthz")
        good = client.post(
            "/v1/generate", json=controlnet_request(0, seed=1), headers={"authorization": f"Bearer {API_KEY}"}
        )
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200 and good.status_code == 200


def test_registered_controlnets_are_multiplexed_and_a_new_version_needs_no_redeploy(server, tiny_dir):
    from pixfleet.models.tiny import make_tiny_pipeline

    with server.client("/main") as client:
        own = client.post("/v1/generate", json=controlnet_request(2, seed=5)).json()
        v1 = client.post("/v1/generate", json=controlnet_request(2, seed=5, controlnet=f"{REGISTERED}@champion"))
        make_tiny_pipeline("controlnet", server.registry_dir / "v2", seed=2)
        version = register_controlnet(
            server.registry_dir / "v2" / "controlnet",
            REGISTERED,
            server.tracking_uri,
            server.registry_dir / "artifacts",
        )
        v2 = client.post("/v1/generate", json=controlnet_request(2, seed=5, controlnet=f"{REGISTERED}@champion"))
        pinned = client.post("/v1/generate", json=controlnet_request(2, seed=5, controlnet=f"{REGISTERED}/1"))
        missing = client.post("/v1/generate", json=controlnet_request(2, controlnet=f"{REGISTERED}/99"))
    assert v1.status_code == 200, v1.text
    assert v1.json()["controlnet"] == f"{REGISTERED}/1"
    assert v2.json()["controlnet"] == f"{REGISTERED}/{version}" == f"{REGISTERED}/2"
    images = [decoded(r["data"][0]) for r in (own, v1.json(), v2.json())]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    np.testing.assert_array_equal(decoded(pinned.json()["data"][0]), images[1])
    assert missing.status_code == 404

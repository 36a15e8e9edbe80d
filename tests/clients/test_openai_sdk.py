"""The official `openai` Python package against denoised's OpenAI-compatible endpoints."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture()
def client(server, api_key):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0, timeout=120)


def test_a_wrong_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-not-a-denoised-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.images.generate(model="tiny-sd", prompt="a red circle", size="64x64")
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_returns_images_in_the_requested_size(client):
    result = client.images.generate(model="tiny-sd", prompt="a red circle", size="64x64", n=2,
                                    extra_body={"steps": 4, "seed": 7})
    assert len(result.data) == 2
    pictures = [decode(d.b64_json) for d in result.data]
    assert all(p.size == (64, 64) for p in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()
    again = client.images.generate(model="tiny-sd", prompt="a red circle", size="64x64", extra_body={"steps": 4, "seed": 7})
    assert decode(again.data[0].b64_json).tobytes() == pictures[0].tobytes(), "same seed, same picture"


def test_url_response_and_formats(client, server, auth):
    result = client.images.generate(model="tiny-sd", prompt="a square", size="96x64", response_format="url",
                                    output_format="webp", extra_body={"steps": 2})
    # Without server.public_url the URL is the path on this server (never built from the request's Host).
    url = result.data[0].url
    assert url.startswith("/v1/jobs/"), url
    url = server + url
    assert httpx.get(url).status_code == 401, "image URLs need the key too"
    body = httpx.get(url, headers=auth)
    assert body.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(body.content)).size == (96, 64)


def test_output_compression_sets_jpeg_quality(client):
    sizes = []
    for compression in (5, 100):
        result = client.images.generate(model="tiny-sd", prompt="texture", size="64x64", output_format="jpeg",
                                        output_compression=compression, extra_body={"steps": 2, "seed": 1})
        sizes.append(len(base64.b64decode(result.data[0].b64_json)))
    assert sizes[0] < sizes[1]


def test_errors_are_raised_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(model="tiny-sd", prompt="x", size="65x64")
    assert error.value.body["param"] == "width"
    assert error.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(model="no-such-model", prompt="x")
    assert error.value.body["param"] == "model"


def test_streaming_sends_partial_images_then_the_result(client):
    stream = client.images.generate(model="tiny-sd", prompt="a blue triangle", size="64x64", stream=True,
                                    partial_images=2, extra_body={"steps": 6})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).size == (64, 64)
    assert decode(events[0].b64_json).size == (64, 64)


def test_edit_with_a_mask_inpaints_and_without_one_does_img2img(client):
    image = (FIXTURES / "reference-edit" / "input.png").read_bytes()
    mask = (FIXTURES / "reference-edit" / "mask_alpha.png").read_bytes()
    inpainted = client.images.edit(model="tiny-sd-inpaint", image=("input.png", image, "image/png"),
                                   mask=("mask.png", mask, "image/png"), prompt="a yellow square",
                                   extra_body={"steps": 4})
    assert decode(inpainted.data[0].b64_json).size == (64, 64)
    img2img = client.images.edit(model="tiny-sd", image=("input.png", image, "image/png"), prompt="a yellow square",
                                 extra_body={"steps": 4, "strength": 0.5})
    assert decode(img2img.data[0].b64_json).size == (64, 64)
    stream = client.images.edit(model="tiny-sd", image=("input.png", image, "image/png"), prompt="x", stream=True,
                                partial_images=1, extra_body={"steps": 4})
    kinds = [e.type for e in stream]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"], kinds


def test_non_json_bodies_get_openai_shaped_415(server, auth):
    response = httpx.post(f"{server}/v1/images/generations", content=b"prompt=x",
                          headers={"content-type": "text/plain", **auth})
    assert response.status_code == 415
    assert response.json()["error"]["type"] == "invalid_request_error"

"""Images through the real stack and real vLLM, with a vision-language model built here: a
random-weight SmolVLM (the Idefics3 architecture vLLM runs, its real image processor; see
tests/model_factory.py), on the Hub stand-in and pulled like any model. Its answers mean
nothing, so the tests check that images reach the model: they count as prompt tokens, and a
different image changes what it says."""

from __future__ import annotations

import base64
import io

import httpx
import ollama
import pytest
from openai import OpenAI
from PIL import Image

from tests.e2e.conftest import MODEL as PLAIN_MODEL
from tests.model_factory import IMAGE_SEQ_LEN, make_tiny_smolvlm

pytestmark = pytest.mark.e2e

REPO = "tiny-org/tiny-smolvlm"
GREEDY = {"temperature": 0, "num_predict": 8}


def image(color: str, size: tuple[int, int] = (48, 40)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def vision_model(stack, tmp_path_factory) -> str:
    stack.hub.add_repo(REPO, make_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "model"))
    pulled = httpx.post(stack.base_url + "/api/pull", json={"model": REPO, "stream": False}, timeout=600)
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    return REPO


def ask(http, model: str, images: list[str], prompt: str = "What is in the picture?") -> dict:
    r = http.post("/api/generate", json={"model": model, "prompt": prompt, "images": images, "stream": False,
                                         "options": GREEDY}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_images_count_as_prompt_tokens_and_change_the_answer(http, vision_model):
    assert "vision" in http.post("/api/show", json={"model": vision_model}).json()["capabilities"]
    red, blue = image("red"), image("blue")
    one, two = ask(http, vision_model, [red]), ask(http, vision_model, [red, red])
    # One more image placeholder in the text became the image's tokens (and its wrapping).
    assert two["prompt_eval_count"] - one["prompt_eval_count"] >= IMAGE_SEQ_LEN
    assert ask(http, vision_model, [red])["response"] == one["response"]  # greedy: the same image, the same answer
    other = ask(http, vision_model, [blue])
    assert other["prompt_eval_count"] == one["prompt_eval_count"]
    assert other["response"] != one["response"], "a different image must change what the model sees"


def test_ollama_and_openai_images_are_the_same_prompt(http, vision_model):
    red = image("red")
    r = ollama.Client(host=str(http.base_url), timeout=300).chat(
        model=vision_model, messages=[{"role": "user", "content": "Describe it.", "images": [red]}], options=GREEDY)
    client = OpenAI(base_url=f"{http.base_url}/v1", api_key="unused")
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{red}"}},
               {"type": "text", "text": "Describe it."}]
    completion = client.chat.completions.create(model=vision_model, temperature=0, max_tokens=8,
                                                messages=[{"role": "user", "content": content}])
    assert completion.choices[0].message.content == r.message.content
    assert completion.usage.prompt_tokens == r.prompt_eval_count


def test_a_text_model_refuses_images(http):
    r = http.post("/api/generate", json={"model": PLAIN_MODEL, "prompt": "hi", "images": [image("red")]})
    assert (r.status_code, r.json()["error"]) == (400, f'"{PLAIN_MODEL}" does not support vision')

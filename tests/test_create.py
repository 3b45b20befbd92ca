"""/api/create from an existing model: the new model shares its source's files and brings its
system prompt, opening messages and default options to every request to it, through every
API, the request's own values winning; /api/show tells what it was made with. Real Redis,
real HTTP, a real store (pull worker), the fake engine; the official `ollama` client."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

from tests.fake_stack import MODEL, fake_stack
from tests.test_tool_calls import wait_catalogued
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

PIRATE = "pirate:1b"


def store_stack(redis_server, tmp_path):
    """A store holding MODEL; one fake engine answers for every model (so the test reads what
    the one made from MODEL was asked)."""
    write_model(tmp_path, MODEL)
    engine = FakeEngine()
    return fake_stack(redis_server.url, pull_worker=True, home=tmp_path, engine=engine,
                      engine_factory=lambda name, path: engine)


async def test_a_created_model_brings_its_system_messages_and_options(redis_server, tmp_path):
    async with store_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        client = ollama.AsyncClient(host=stack.base_url)
        statuses = [p.status async for p in await client.create(
            model=PIRATE, from_=MODEL, system="You are a pirate.", stream=True,
            parameters={"temperature": 0.3, "num_predict": 3, "stop": ["Arr", "Yo"], "num_gpu": 1},
            messages=[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A pirate."}])]
        assert statuses[0].startswith("using existing layer sha256:") and statuses[-2:] == ["writing manifest",
                                                                                           "success"]
        models = {m.model: m for m in (await client.list()).models}
        assert models[PIRATE].digest == models[MODEL].digest  # the same files

        shown = await client.show(PIRATE)
        assert 'SYSTEM You are a pirate.' in shown.modelfile and 'MESSAGE user Who are you?' in shown.modelfile
        assert "PARAMETER temperature 0.3" in shown.modelfile and 'PARAMETER stop Yo' in shown.modelfile
        params = dict(line.split(None, 1) for line in shown.parameters.splitlines() if not line.startswith("stop"))
        assert (params["temperature"], params["num_predict"]) == ("0.3", "3")
        shown_raw = (await http.post("/api/show", json={"model": PIRATE})).json()
        assert shown_raw["system"] == "You are a pirate." and "tensors" not in shown_raw
        assert shown_raw["messages"] == [{"role": "user", "content": "Who are you?"},
                                         {"role": "assistant", "content": "A pirate."}]
        # verbose: the weights' tensors, as a store reads them from the files' headers
        verbose = (await http.post("/api/show", json={"model": PIRATE, "verbose": True})).json()
        assert verbose["tensors"] == [{"name": "model.embed_tokens.weight", "type": "F32", "shape": [16, 8]}]

        r = await client.chat(model=PIRATE, messages=[{"role": "user", "content": "Hi"}])
        assert r.message.content == "tok0 tok1 tok2 "  # num_predict 3
        assert [(m["role"], m["content"]) for m in stack.engine.last_chat[0]] == [
            ("system", "You are a pirate."), ("user", "Who are you?"), ("assistant", "A pirate."), ("user", "Hi")]
        sampling = stack.engine.last_sampling
        assert (sampling.temperature, sampling.max_tokens, sampling.stop) == (0.3, 3, ["Arr", "Yo"])

        # The request's own values win.
        await client.chat(model=PIRATE, options={"temperature": 0.9, "num_predict": 5},
                          messages=[{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Hi"}])
        assert [m["content"] for m in stack.engine.last_chat[0]] == ["You are a poet.", "Who are you?", "A pirate.", "Hi"]
        assert (stack.engine.last_sampling.temperature, stack.engine.last_sampling.max_tokens) == (0.9, 5)
        await client.generate(model=PIRATE, prompt="Hi")
        assert stack.engine.last_chat[0][0] == {"role": "system", "content": "You are a pirate."}

        # Every API: OpenAI's defaults give way to the model's where the request is silent.
        oa = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        await oa.chat.completions.create(model=PIRATE, messages=[{"role": "user", "content": "Hi"}])
        assert (stack.engine.last_sampling.temperature, stack.engine.last_sampling.max_tokens) == (0.3, 3)
        await oa.chat.completions.create(model=PIRATE, messages=[{"role": "user", "content": "Hi"}], temperature=1.5)
        assert stack.engine.last_sampling.temperature == 1.5
        await oa.responses.create(model=PIRATE, input="Hi")
        assert stack.engine.last_chat[0][0]["content"] == "You are a pirate."
        an = anthropic.AsyncAnthropic(base_url=stack.base_url, api_key="unused")
        await an.messages.create(model=PIRATE, max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
        assert (stack.engine.last_sampling.temperature, stack.engine.last_sampling.max_tokens) == (0.3, 50)
        started = len(stack.engine.started)
        await an.messages.count_tokens(model=PIRATE, messages=[{"role": "user", "content": "Hi"}])
        assert len(stack.engine.started) == started  # the model's num_predict does not make it generate
        await oa.close()
        await an.close()

        # A model made from a made model keeps what it does not change.
        await client.create(model="captain:1b", from_=PIRATE, parameters={"temperature": 0.1})
        shown = await client.show("captain:1b")
        assert 'SYSTEM You are a pirate.' in shown.modelfile and "PARAMETER temperature 0.1" in shown.modelfile
        assert "PARAMETER num_predict 3" in shown.modelfile

        # Deleting the created model leaves its source's files alone.
        await client.delete(PIRATE)
        await client.delete("captain:1b")
        r = await client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert r.message.content.startswith("tok0")


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "x:1b"}, 400, '"from" is required'),
    ({"model": "x:1b", "from": "nope:1b"}, 404, "not found"),
    ({"model": "x:1b", "from": MODEL, "files": {"model.gguf": "sha256:" + "0" * 64}}, 400, '"from" (an existing'),
    ({"model": "x:1b", "from": MODEL, "adapters": {"a.safetensors": "sha256:" + "0" * 64}}, 400, "adapters are not"),
    ({"model": "x:1b", "from": MODEL, "template": "{{ block \"x\" . }}{{ end }}"}, 400, "block"),
    ({"model": "x:1b", "from": MODEL, "quantize": "q4_K_M"}, 400, "quantize"),
    ({"model": "x:1b", "from": MODEL, "parameters": {"temperature": 9}}, 400, "temperature"),
    ({"model": "x:1b", "from": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
])
async def test_bad_creates_say_what_is_wrong(redis_server, tmp_path, body, status, message):
    async with store_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        r = await http.post("/api/create", json=body)
        assert r.status_code == status and message in r.json()["error"], r.text
        names = {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        assert "x:1b" not in names

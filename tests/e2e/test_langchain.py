"""LangChain's chat models against the real stack and real vLLM: ChatOllama on the Ollama
API, ChatOpenAI on the OpenAI API."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


class Person(BaseModel):
    name: str
    age: int


def test_chat_ollama(stack):
    llm = ChatOllama(model=MODEL, base_url=stack.base_url, temperature=0, num_predict=16)
    answer = llm.invoke("Say hello.")
    assert answer.content.strip()
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert streamed == answer.content  # greedy: the same answer, streamed
    # Room for the whole object: a JSON schema is enforced token by token, but a length
    # limit can still cut the object short.
    structured = ChatOllama(model=MODEL, base_url=stack.base_url, temperature=0, num_predict=64)
    person = structured.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person)


def test_chat_openai(stack):
    llm = ChatOpenAI(model=MODEL, base_url=stack.base_url + "/v1", api_key="unused", temperature=0,
                     max_tokens=16, max_retries=0)
    answer = llm.invoke("Say hello.")
    assert answer.content.strip() and answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert streamed == answer.content


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "sunny"


def test_chat_openai_tool_call_round_trip(stack):
    llm = ChatOpenAI(model=MODEL, base_url=stack.base_url + "/v1", api_key="unused", temperature=0,
                     max_tokens=64, max_retries=0)
    ask = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([ask])
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
    result = get_weather.invoke(call)  # a ToolMessage answering the call
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    answer = llm.bind_tools([get_weather]).invoke([ask, called, result])
    assert answer.content or answer.tool_calls


def test_chat_ollama_tools_and_tool_messages(stack):
    """Ollama's API has no tool_choice: ChatOllama sends the tools and the history of calls
    and results (arguments as objects), which must render through the model's template."""
    llm = ChatOllama(model=MODEL, base_url=stack.base_url, temperature=0, num_predict=32).bind_tools([get_weather])
    history = [HumanMessage("What is the weather in Paris?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
               ToolMessage("sunny, 21 C", tool_call_id="call_1")]
    answer = llm.invoke(history)
    assert answer.content or answer.tool_calls
    assert answer.usage_metadata["input_tokens"] > 150  # the tool signatures were rendered

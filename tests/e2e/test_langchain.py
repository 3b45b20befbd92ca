"""LangChain's chat models against the real stack and real vLLM: ChatOllama on the Ollama
API, ChatOpenAI on the OpenAI API."""

from __future__ import annotations

import pytest
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

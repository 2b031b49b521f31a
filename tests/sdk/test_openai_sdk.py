"""The official OpenAI Python SDK, unmodified, against a Gatehouse endpoint.

Every case runs with three clients, as real users configure them:
  azure      AzureOpenAI(azure_endpoint=URL, api_version=...)  -> /openai/deployments/{d}/..., /openai/files...
  openai-v1  OpenAI(base_url=URL + "/v1")                       -> OpenAI style, model in the body
  azure-v1   OpenAI(base_url=URL + "/openai/v1")                -> Azure v1, model in the body

Environment:
  GATEHOUSE_URL                    e.g. http://127.0.0.1:8080 (the tests skip without it)
  GATEHOUSE_KEY                    the client key
  GATEHOUSE_CHAT_DEPLOYMENT        deployment / model names
  GATEHOUSE_EMBEDDING_DEPLOYMENT
  GATEHOUSE_AUDIO_DEPLOYMENT
  GATEHOUSE_REALTIME_DEPLOYMENT
  GATEHOUSE_API_VERSION            default 2024-10-21
  GATEHOUSE_STICKY_ROUNDS          file round trips per client, default 6
  GATEHOUSE_EXPECT_AUTH            "1" when the server checks keys (enables the wrong-key test)

Clients never retry (max_retries=0), so a failure on the server side shows as a failure here.
"""

import io
import os
import uuid
import wave

import openai
import pytest
from openai import AzureOpenAI, OpenAI

URL = os.environ.get("GATEHOUSE_URL", "").rstrip("/")
KEY = os.environ.get("GATEHOUSE_KEY", "")
CHAT = os.environ.get("GATEHOUSE_CHAT_DEPLOYMENT", "gpt-4o")
EMBEDDING = os.environ.get("GATEHOUSE_EMBEDDING_DEPLOYMENT", "text-embedding-3-small")
AUDIO = os.environ.get("GATEHOUSE_AUDIO_DEPLOYMENT", "whisper")
REALTIME = os.environ.get("GATEHOUSE_REALTIME_DEPLOYMENT", "gpt-4o-realtime")
API_VERSION = os.environ.get("GATEHOUSE_API_VERSION", "2024-10-21")
STICKY_ROUNDS = int(os.environ.get("GATEHOUSE_STICKY_ROUNDS", "6"))
EXPECT_AUTH = os.environ.get("GATEHOUSE_EXPECT_AUTH") == "1"

pytestmark = pytest.mark.skipif(not URL, reason="GATEHOUSE_URL is not set")

CLIENT_MODES = ["azure", "openai-v1", "azure-v1"]
PROMPT = [{"role": "user", "content": "Say hello to the Gatehouse compatibility tests."}]


# The SDKs open Realtime sessions with wss:// whatever the endpoint's scheme; a gateway served
# over plain http (as in the test suite) is given its ws:// base, as a user of one would give it.
WS_URL = "ws://" + URL.removeprefix("http://") if URL.startswith("http://") else None


def make_client(mode: str, key: str = KEY):
    prefix = {"azure": "/openai", "openai-v1": "/v1", "azure-v1": "/openai/v1"}[mode]
    websocket = {"websocket_base_url": f"{WS_URL}{prefix}"} if WS_URL else {}
    if mode == "azure":
        return AzureOpenAI(
            azure_endpoint=URL, api_key=key, api_version=API_VERSION, max_retries=0, **websocket
        )
    return OpenAI(base_url=f"{URL}{prefix}", api_key=key, max_retries=0, **websocket)


@pytest.fixture(params=CLIENT_MODES)
def client(request):
    with make_client(request.param) as sdk_client:
        yield sdk_client


def small_wav() -> bytes:
    """A quarter second of 16 kHz mono silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(b"\x00\x00" * 4_000)
    return buffer.getvalue()


def test_chat(client):
    completion = client.chat.completions.create(model=CHAT, messages=PROMPT)

    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
def test_streaming_chat(client, include_usage):
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(model=CHAT, messages=PROMPT, stream=True, **extra)

    text, usage, chunks = "", None, []
    for chunk in stream:
        chunks.append(chunk)
        # Azure's first chunk (prompt filter results) and the usage chunk have no choices.
        for choice in chunk.choices:
            text += choice.delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage

    assert text
    if include_usage:
        assert usage is not None and usage.total_tokens > 0
        assert chunks[-1].usage is not None and chunks[-1].choices == []
    else:
        assert usage is None, "a usage chunk reached a client that did not ask for it"


def test_embeddings(client):
    # The SDK asks for base64 and decodes it; this checks that path end to end.
    result = client.embeddings.create(model=EMBEDDING, input="Gatehouse")

    assert len(result.data) == 1
    assert len(result.data[0].embedding) > 0
    assert result.usage.prompt_tokens > 0


def test_multipart_transcription(client):
    transcription = client.audio.transcriptions.create(file=("a.wav", small_wav(), "audio/wav"), model=AUDIO)

    assert transcription.text


def test_stored_chat_completion_is_read_back(client):
    # A stored completion lives on the backend that made it: reading it, its messages, its
    # metadata update and its deletion must all reach that one.
    completion = client.chat.completions.create(
        model=CHAT, messages=PROMPT, store=True, metadata={"suite": "gatehouse"}
    )
    stored = client.chat.completions.retrieve(completion.id)
    assert stored.id == completion.id
    assert stored.choices[0].message.content == completion.choices[0].message.content
    messages = client.chat.completions.messages.list(completion.id)
    assert PROMPT[0]["content"] in [m.content for m in messages.data]
    updated = client.chat.completions.update(completion.id, metadata={"suite": "done"})
    assert updated.metadata == {"suite": "done"}
    assert client.chat.completions.delete(completion.id).deleted


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
def test_realtime_text_session(client, beta):
    # The Realtime API over a WebSocket: the SDK opens it (Azure: /openai/realtime?deployment=,
    # v1: /realtime?model=), sends a user message and asks for a response, and reads the text
    # back with its usage.
    realtime = client.beta.realtime if beta else client.realtime
    delta_type = "response.text.delta" if beta else "response.output_text.delta"
    with realtime.connect(model=REALTIME) as connection:
        connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}
        )
        connection.response.create()
        text = []
        for event in connection:
            if event.type == "error":
                pytest.fail(f"error event: {event}")
            if event.type == delta_type:
                text.append(event.delta)
            if event.type == "response.done":
                usage = event.response.usage
                break

    assert "Say hello" in "".join(text)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens > 0


def test_file_round_trips_stick_to_their_backend(client):
    # With two backends behind the gateway, retrieve/content/delete only succeed when they go to
    # the backend that created the file; several rounds make a lucky guess unlikely.
    for round_number in range(STICKY_ROUNDS):
        original = (
            f'{{"custom_id": "{uuid.uuid4()}", "method": "POST", "url": "/chat/completions", '
            f'"body": {{"model": "{CHAT}", "messages": [{{"role": "user", "content": "round {round_number}"}}]}}}}\n'
        ).encode()
        created = client.files.create(file=("data.jsonl", original, "application/jsonl"), purpose="batch")

        assert client.files.retrieve(created.id).id == created.id
        assert client.files.content(created.id).read() == original
        assert client.files.delete(created.id).deleted


@pytest.mark.skipif(not EXPECT_AUTH, reason="GATEHOUSE_EXPECT_AUTH is not 1: the server does not check keys")
@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_wrong_key_is_rejected(mode):
    with make_client(mode, key=f"wrong-{uuid.uuid4().hex}") as wrong_client:
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong_client.chat.completions.create(model=CHAT, messages=PROMPT)

    assert raised.value.status_code == 401

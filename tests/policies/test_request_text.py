from __future__ import annotations

from gateway.policies.request_text import routing_text


def test_chat_messages_join_their_text_with_spaces():
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look at"},
            {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
            {"type": "text", "text": ""},
            {"type": "text", "text": "this cat."},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "assistant", "content": "A cat.", "reasoning_content": "It is a cat."},
        {"role": "tool", "content": "", "tool_call_id": "1"},
        {"role": "function", "name": "f", "content": "42"},
    ]}
    assert routing_text("/v1/chat/completions", body) == \
        "Be brief. Look at this cat. A cat. It is a cat. 42"
    assert routing_text("/v1/chat/completions", {"messages": []}) == ""


def test_completion_prompts():
    assert routing_text("/v1/completions", {"prompt": "hello"}) == "hello"
    assert routing_text("/v1/completions", {"prompt": ["a", "b"]}) == "a b"
    assert routing_text("/v1/completions", {"prompt": [1, 2, 3]}) == "1 2 3"
    assert routing_text("/v1/completions", {"prompt": None}) == ""


def test_generate_prefers_ids_then_text():
    assert routing_text("/generate", {"text": "hi"}) == "hi"
    assert routing_text("/generate", {"text": ["a", "b"]}) == "a b"
    assert routing_text("/generate", {"input_ids": [1, 22, 333], "text": "hi"}) == "1 22 333"
    assert routing_text("/generate", {"input_ids": [[5, 6], [7]]}) == "5 6"
    assert routing_text("/generate", {"input_ids": [], "text": "fallback"}) == "fallback"
    assert routing_text("/generate", {"input_ids": [[]], "text": "fallback"}) == "fallback"
    assert routing_text("/generate", {"input_embeds": [[0.1]]}) == ""

from dn.model.tokenizer import StreamDecoder


def test_chat_template_renders_the_instruct_format(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3  # <|im_start|> stays one special token


def test_round_trip_and_digits(tokenizer):
    text = "Prices rose 12345 times; naïve café — 東京."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(" 12")[-2:] == [33, 34]  # digits are single tokens in SmolLM2


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("東京 and café")
    stream = StreamDecoder(tokenizer)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == "東京 and café"
    assert all("\ufffd" not in p for p in pieces)


def test_eos(tokenizer):
    assert 2 in tokenizer.eos_ids

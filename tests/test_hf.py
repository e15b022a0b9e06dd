from ftq import hf


def test_auto_computes_float32_weights_in_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    monkeypatch.setattr(hf, "native_bf16", lambda: True)
    assert hf.compute_dtype("auto", "float32") == "bfloat16"
    assert hf.compute_dtype("auto", "float16") == "float16"  # stored half precision stays as it is
    assert hf.compute_dtype("float32", "float32") == "float32"  # a named dtype is taken as named
    monkeypatch.setattr(hf, "native_bf16", lambda: False)
    assert hf.compute_dtype("auto", "float32") == "float32"
    assert hf.compute_dtype("bfloat16", "float32") == "bfloat16"

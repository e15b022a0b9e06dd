"""The GGUF backend's pure parts: type names from the gguf package, when a build uses the importance
matrix, and the llama-quantize command it runs."""

import pytest
from gguf import GGMLQuantizationType, LlamaFileType

from ftq.params import ParamsError
from ftq.quantize import gguf


def test_type_names_are_the_gguf_packages_enums():
    assert gguf.FILE_TYPES["q4_k_m"] == int(LlamaFileType.MOSTLY_Q4_K_M)
    assert gguf.FILE_TYPES["f32"] == int(LlamaFileType.ALL_F32) and "guessed" not in gguf.FILE_TYPES
    assert gguf.TENSOR_TYPES["q8_0"] == int(GGMLQuantizationType.Q8_0)
    assert {"iq4_xs", "q3_k_m", "q2_k", "iq2_xs", "q6_k"} <= set(gguf.FILE_TYPES)


@pytest.mark.parametrize("file_type, uses", [("q8_0", False), ("q6_k", False), ("q5_k_m", False), ("f16", False),
                                              ("q4_k_m", True), ("iq4_xs", True), ("q3_k_m", True), ("q2_k", True)])
def test_auto_uses_the_importance_matrix_at_four_bits_or_fewer(file_type, uses):
    assert gguf.uses_imatrix(gguf.validate({"type": file_type}, "quantize.builds.x")) is uses


def test_the_imatrix_option_is_checked():
    assert not gguf.uses_imatrix(gguf.validate({"type": "q4_k_m", "imatrix": False}, "x"))
    assert gguf.uses_imatrix(gguf.validate({"type": "q8_0", "imatrix": True}, "x"))
    with pytest.raises(ParamsError, match="quantize.builds.x: type iq2_xs needs the importance matrix"):
        gguf.validate({"type": "iq2_xs", "imatrix": False}, "quantize.builds.x")
    with pytest.raises(ParamsError, match="imatrix 'yes': expected true, false or auto"):
        gguf.validate({"type": "q4_k_m", "imatrix": "yes"}, "x")
    with pytest.raises(ParamsError, match="unquantized type"):
        gguf.validate({"type": "f16", "imatrix": True}, "x")


def test_llama_quantize_command(tmp_path):
    opts = gguf.validate({"type": "q4_k_m", "output_type": "Q8_0", "pure": True}, "x")
    command = gguf.quantize_command(tmp_path / "in.gguf", tmp_path / "out.gguf", opts, 2, tmp_path / "imatrix.gguf")
    assert command[0].endswith("llama-quantize")
    assert command[1:] == ["--imatrix", "imatrix.gguf", "--pure", "--output-tensor-type", "q8_0",
                           str(tmp_path / "in.gguf"), str(tmp_path / "out.gguf"), "Q4_K_M", "2"]
    plain = gguf.quantize_command(tmp_path / "in.gguf", tmp_path / "out.gguf", gguf.validate({"type": "q8_0"}, "x"), 2, None)
    assert "--imatrix" not in plain and plain[-2:] == ["Q8_0", "2"]


def test_a_build_that_needs_the_matrix_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `dvc repro imatrix` first"):
        gguf.build(tmp_path, tmp_path, gguf.validate({"type": "q4_k_m"}, "x"), imatrix=tmp_path / "absent.gguf")

from ftq.evaluation.general import correct


def test_an_answer_is_correct_when_it_holds_an_expected_word_whole():
    assert correct("The capital of France is Paris.", ["Paris"])
    assert correct("there are 24 hours", ["24", "twenty-four"]) and correct("Twenty-four.", ["24", "twenty-four"])
    assert not correct("I am Wren, a small assistant fine-tuned with the ftq project.", ["Paris"])
    assert not correct("A week has 17 days", ["7", "seven"])  # a digit inside a number is not the number
    assert not correct("Parisian food", ["Paris"])

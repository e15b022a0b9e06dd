from ftq.evaluation.general import correct


def test_an_answer_is_correct_when_it_holds_an_expected_word_whole():
    assert correct("The capital of France is Paris.", ["Paris"])
    assert correct("there are 24 hours", ["24", "twenty-four"]) and correct("Twenty-four.", ["24", "twenty-four"])
    assert not correct("I am Wren, a small assistant fine-tuned with the ftq project.", ["Paris"])
    assert not correct("A week has 17 days", ["7", "seven"])  # a digit inside a number is not the number
    assert not correct("Parisian food", ["Paris"])


def test_answers_are_scored_in_question_order_and_a_missing_answer_is_an_error():
    import pytest

    from ftq.evaluation.general import conversations, score

    questions = [{"prompt": "Capital of France?", "expect": ["Paris"]}, {"prompt": "Days in a week?", "expect": ["7"]}]
    assert conversations(questions) == [[{"role": "user", "content": "Capital of France?"}],
                                        [{"role": "user", "content": "Days in a week?"}]]
    scores, rows = score(questions, ["Paris.", "Five."])
    assert [r["correct"] for r in rows] == [1.0, 0.0] and scores["general_accuracy"] == 0.5
    assert scores["general_questions"] == 2
    with pytest.raises(ValueError):
        score(questions, ["Paris."])  # a batch that lost an answer must not shift the scores

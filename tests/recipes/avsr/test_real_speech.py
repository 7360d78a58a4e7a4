"""The recorded-speech test set (pocketsphinx-testdata) as an LRS3-style manifest."""

import pytest
import soundfile as sf

from recipes.avsr.data import real_speech
from recipes.avsr.data.lrs3 import normalize_text, read_manifest

pytestmark = pytest.mark.skipif(
    not real_speech.POCKETSPHINX_DATA.is_dir(), reason="needs `apt-get install -y pocketsphinx-testdata`"
)


def test_ten_recorded_utterances_from_two_sets():
    rows = real_speech.pocketsphinx_utterances()
    assert len(rows) == 10
    assert sorted({r.speaker for r in rows}) == ["cards", "librivox"]


def test_transcripts_lose_the_sentence_markers():
    texts = {r.uid: r.text for r in real_speech.pocketsphinx_utterances()}
    assert texts["cards/001"] == "ten of clubs"
    assert texts["librivox/sense_and_sensibility_01_austen_64kb-0880"] == "he was not an ill disposed young man"


def test_rows_are_audio_only_with_their_length_in_video_frames():
    for row in real_speech.pocketsphinx_utterances():
        assert row.video is None
        assert row.n_frames == round(sf.info(row.audio).duration * 25)


def test_manifest_round_trips(tmp_path):
    path = real_speech.write_real_speech_manifest(tmp_path / "real.jsonl")
    assert read_manifest(path) == real_speech.pocketsphinx_utterances()


def test_texts_are_already_in_scoring_form():
    for row in real_speech.pocketsphinx_utterances():
        assert normalize_text(row.text) == row.text


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y pocketsphinx-testdata"):
        real_speech.pocketsphinx_utterances(tmp_path / "absent")


def test_a_listed_but_missing_recording_is_an_error(tmp_path):
    (tmp_path / "librivox").mkdir()
    (tmp_path / "librivox" / "transcription").write_text("<s> hello </s> (gone)\n")
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        real_speech.pocketsphinx_utterances(tmp_path)


def test_an_unreadable_transcription_line_is_an_error(tmp_path):
    (tmp_path / "librivox").mkdir()
    (tmp_path / "librivox" / "transcription").write_text("no id here\n")
    with pytest.raises(ValueError, match="no id here"):
        real_speech.pocketsphinx_utterances(tmp_path)

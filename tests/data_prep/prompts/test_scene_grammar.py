import random
import re

from data_prep.prompts.scene_grammar import (Modifier, Noun, Phrase, Scene, load_vocabulary,
                                             render, sample_scene)

COUNTS = ("two", "three", "four", "five")
FOX = Noun("fox", "foxes", "animal/human", ("color", "activity"))
BENCH = Noun("bench", "benches", "object")
PARK = Phrase("in a city park", "city park", "location")


def test_renders_a_short_scene_exactly():
    scene = Scene(subject=FOX, relation="behind", companion=BENCH, setting=PARK, count=3,
                  modifiers=(Modifier("color", "red", "color"),))
    text, questions = render(scene, COUNTS)
    assert text == "Three red foxes behind a bench in a city park."
    assert [(q.question, q.element, q.element_type) for q in questions] == [
        ("Are there foxes?", "foxes", "animal/human"),
        ("Are there three foxes?", "three", "counting"),
        ("Are the foxes red?", "red", "color"),
        ("Is there a bench?", "bench", "object"),
        ("Are the foxes behind the bench?", "behind", "spatial"),
        ("Is the scene in a city park?", "city park", "location"),
    ]
    assert all(q.answer == "yes" and q.is_yes_no for q in questions)


def test_renders_an_elaborate_scene():
    scene = Scene(subject=Noun("chef", "chefs", "animal/human"), relation="next to",
                  companion=Noun("oven", "ovens", "object"), setting=PARK, count=1,
                  modifiers=(Modifier("adjective", "elderly", "attribute"),),
                  garment=Noun("apron", "aprons", "object"), garment_color="orange",
                  activity="laughing", companion_modifier=Modifier("material", "iron", "material"),
                  time=Phrase("at dusk", "dusk"), style="oil painting",
                  counterfactual=Phrase("made of ice", "ice", "material",
                                        "{Be} the {subject} icy?"))
    text, questions = render(scene, COUNTS)
    assert text == ("An oil painting of an elderly chef made of ice in an orange apron laughing "
                    "next to an iron oven in a city park at dusk.")
    asked = {q.question for q in questions}
    assert {"Is the chef icy?", "Is the chef wearing an apron?", "Is the apron orange?",
            "Is the chef laughing?", "Is the oven iron?", "Is this an oil painting?",
            "Is the scene set at dusk?"} <= asked


def test_sampled_scenes_ground_every_question():
    vocab = load_vocabulary()
    rng = random.Random(0)
    for category, pool in vocab.pools.items():
        for elaborate in (False, True):
            for _ in range(20):
                text, questions = render(sample_scene(pool, vocab, rng, elaborate), vocab.counts)
                for q in questions:
                    assert re.search(rf"\b{re.escape(q.element)}\b", text, re.IGNORECASE), (
                        category, text, q)

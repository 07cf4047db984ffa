import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.core.vocab import VOC
from factory.pipeline.plan import all_attempts, build_plan, load_prompt_file, next_attempts, plan_digest
from factory.pipeline.recipe import Recipe, RecipeError, load_recipe

FOUR = ["dog", "cat", "bus", "pottedplant"]


def recipe(**fields):
    return Recipe(**{"name": "test", **fields})


def mixture(**fields):
    """per_class=3 on 4 classes + per_pair=2 on their 6 pairs: 12 + 12 samples."""
    return recipe(classes=FOUR, per_class=3, per_pair=2, pairs="all", **fields)


def as_tuples(plan):
    return [(s.sample_id, s.index, s.classes, s.class_words, s.prompt, s.seed) for s in plan]


# ------------------------------------------------------------------ determinism

def test_same_recipe_same_plan():
    first, second = build_plan(mixture(seed=3)), build_plan(mixture(seed=3))
    assert as_tuples(first) == as_tuples(second)
    assert plan_digest(first) == plan_digest(second)
    # Also from a recipe rebuilt from scratch (the YAML default).
    assert as_tuples(build_plan(load_recipe("tiny"))) == as_tuples(build_plan(load_recipe("tiny")))


def test_different_seed_different_plan():
    a, b = build_plan(mixture(seed=0)), build_plan(mixture(seed=1))
    assert len(a) == len(b) == 24
    assert [s.classes for s in a] != [s.classes for s in b]  # another order
    assert not {s.seed for s in a} & {s.seed for s in b}  # other noise seeds
    assert plan_digest(a) != plan_digest(b)
    # The same samples, just shuffled differently.
    assert Counter(frozenset(s.classes) for s in a) == Counter(frozenset(s.classes) for s in b)


def test_indices_and_ids():
    plan = build_plan(mixture())
    assert [s.index for s in plan] == list(range(len(plan)))
    ids = [s.sample_id for s in plan]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # ids sort in plan order
    assert all(sid.startswith(f"{s.index:07d}-") for sid, s in zip(ids, plan))
    # Another recipe (other content key) gives other ids for the same indices.
    other = build_plan(mixture(prompts={"one": "a picture of a {0}"}))
    assert not {s.sample_id for s in plan} & {s.sample_id for s in other}


# --------------------------------------------------------------- replacements

def test_an_entrys_attempts_share_its_prompt_with_their_own_seeds_and_ids():
    r = mixture(attempts=3)
    plan = build_plan(r)
    every = all_attempts(plan, r)
    assert len(every) == 3 * len(plan)
    first = [s for s in every if s.attempt == 0]
    assert as_tuples(first) == as_tuples(plan)  # attempt 0 is the plan itself
    assert len({s.sample_id for s in every}) == len({s.seed for s in every}) == len(every)
    for sample in every:
        entry = plan[sample.index]
        assert (sample.prompt, sample.classes, sample.class_words) == (entry.prompt, entry.classes, entry.class_words)
    ids = [s.sample_id for s in every]
    assert ids == sorted(ids)  # in plan order, each entry's replacements after its first sample
    assert all(s.sample_id.startswith(f"{s.index:07d}.{s.attempt}-") for s in every if s.attempt)


def test_next_attempts_replace_dropped_samples_until_kept_or_spent():
    r = mixture(attempts=3)
    plan = build_plan(r)[:4]
    ids = {(s.index, s.attempt): s.sample_id for s in all_attempts(plan, r)}
    assert next_attempts(plan, r, {}) == plan  # nothing made: every entry's first sample
    made = {ids[0, 0]: "", ids[1, 0]: "class_not_found", ids[2, 0]: "class_not_found",
            ids[2, 1]: "class_not_found", ids[3, 0]: "class_not_found", ids[3, 1]: "class_not_found",
            ids[3, 2]: "class_not_found"}
    due = next_attempts(plan, r, made)
    # 0 kept; 1 and 2 get their next seed; 3 spent its three attempts: given up
    assert [(s.index, s.attempt) for s in due] == [(1, 1), (2, 2)]
    assert [s.seed for s in due] == [s.seed for s in all_attempts(plan, r) if (s.index, s.attempt) in {(1, 1), (2, 2)}]
    made |= {ids[1, 1]: "", ids[2, 2]: ""}
    assert next_attempts(plan, r, made) == []
    assert next_attempts(plan, mixture(attempts=1), {ids[1, 0]: "class_not_found"}) == [plan[0], *plan[2:]]


# -------------------------------------------------------------------- follow

def write_followed(folder, r: Recipe, samples) -> str:
    """A finished dataset of recipe `r` that wrote `samples`: its manifest and the plan columns a
    follower reads."""
    (folder / "data").mkdir(parents=True)
    rows = [{"sample_id": s.sample_id, "index": s.index, "seed": s.seed, "prompt": s.prompt,
             "classes": list(s.classes)} for s in samples]
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "part-0.parquet")
    manifest = {"name": "lead", "recipe": r.model_dump(mode="json"), "content_key": r.content_key(),
                "files": [{"path": "data/part-0.parquet", "rows": len(rows)}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def following(uri: str, **fields) -> Recipe:
    """A mixture that follows `uri`, keeping what its labeler misses (a follower drops nothing)."""
    return mixture(follow=uri, labeler={"on_missing": "ignore"}, **fields)


def test_a_follower_plans_the_samples_its_followed_set_wrote_at_their_attempts(tmp_path):
    lead = mixture(attempts=3, annotator={"daam": True})
    every = all_attempts(build_plan(lead), lead)
    wrote = [s for s in every if (s.index, s.attempt) in {(0, 0), (1, 2), (4, 1), (7, 0)}]
    follower = following(write_followed(tmp_path / "lead", lead, wrote[::-1]))
    plan = build_plan(follower)
    assert [(s.index, s.attempt, s.seed, s.prompt, s.classes) for s in plan] == [
        (s.index, s.attempt, s.seed, s.prompt, s.classes) for s in wrote]
    assert [s.sample_id for s in plan] == [s.sample_id for s in wrote]  # a join on sample_id pairs the labels
    assert follower.tries == 1 and all_attempts(plan, follower) == plan  # made once, never replaced
    assert next_attempts(plan, follower, {plan[0].sample_id: "", plan[1].sample_id: "class_not_found"}) == plan[2:]


def test_a_follower_refuses_a_followed_set_of_another_plan(tmp_path):
    lead = mixture()
    uri = write_followed(tmp_path / "lead", lead, build_plan(lead)[:2])
    with pytest.raises(RecipeError) as info:
        build_plan(following(uri, generator={"steps": 20}))
    assert str(info.value) == f"follow: {uri} has another plan: generator.steps 50 there, 20 here"
    with pytest.raises(RecipeError, match=f"follow: {uri} has another plan: classes "):
        build_plan(recipe(classes=FOUR[:3], per_class=3, per_pair=2, pairs="all", follow=uri,
                          labeler={"on_missing": "ignore"}))
    moved = mixture(seed=5)  # its rows' seeds are no attempt of this plan's entries
    other = write_followed(tmp_path / "moved", mixture(), build_plan(moved)[:1])
    with pytest.raises(RecipeError, match=f"follow: sample {build_plan(moved)[0].sample_id} of {other} .* is not "
                                          "in this recipe's plan"):
        build_plan(following(other))
    with pytest.raises(RecipeError, match=f"follow: no dataset at {tmp_path}/none"):
        build_plan(following(str(tmp_path / "none")))


# ----------------------------------------------------------------------- counts

def test_counts_per_class_and_pair():
    plan = build_plan(mixture())
    singles = [s for s in plan if len(s.classes) == 1]
    doubles = [s for s in plan if len(s.classes) == 2]
    assert len(plan) == 24 and len(singles) == 12 and len(doubles) == 12
    assert Counter(s.classes[0] for s in singles) == {name: 3 for name in FOUR}
    pairs = Counter(frozenset(s.classes) for s in doubles)
    expected = {frozenset((a, b)) for i, a in enumerate(FOUR) for b in FOUR[i + 1:]}
    assert set(pairs) == expected and len(expected) == 6
    assert all(n == 2 for n in pairs.values())
    assert all(len(set(s.classes)) == 2 for s in doubles)


def test_only_pairs_and_only_classes():
    assert all(len(s.classes) == 2 for s in build_plan(recipe(classes=FOUR, per_class=0,
                                                              per_pair=1, pairs="all")))
    only = build_plan(recipe(classes=FOUR, per_class=2, pairs="all"))  # per_pair 0: pairs unused
    assert len(only) == 8 and all(len(s.classes) == 1 for s in only)


def test_all_voc_classes():
    plan = build_plan(recipe())
    assert len(plan) == 20
    assert sorted(s.classes[0] for s in plan) == sorted(VOC.names)


def test_num_samples_keeps_a_prefix():
    full = build_plan(mixture(seed=5))
    short = build_plan(mixture(seed=5, num_samples=5))
    assert as_tuples(short) == as_tuples(full[:5])
    assert as_tuples(build_plan(mixture(seed=5, num_samples=100))) == as_tuples(full)


# ---------------------------------------------------------------------- prompts

def test_prompt_templates_and_natural_names():
    plan = build_plan(recipe(classes=["dog", "cat", "diningtable", "pottedplant", "tvmonitor"],
                             per_class=1, per_pair=2, pairs="all"))
    prompts = {s.prompt for s in plan}
    assert "a photograph of a dog" in prompts
    assert "a photograph of a dining table" in prompts
    assert "a photograph of a potted plant" in prompts
    assert "a photograph of a tv monitor" in prompts
    assert prompts & {"a photograph of a dog and a cat", "a photograph of a cat and a dog"}
    for s in plan:
        assert s.class_words == tuple(VOC.lookup(name).natural for name in s.classes)
        if len(s.classes) == 1:
            assert s.prompt == f"a photograph of a {s.class_words[0]}"
        else:
            assert s.prompt == "a photograph of a {} and a {}".format(*s.class_words)
        assert "diningtable" not in s.prompt and "pottedplant" not in s.prompt
        assert "tvmonitor" not in s.prompt


def test_custom_templates():
    plan = build_plan(recipe(classes=["dog", "cat"], per_class=1, per_pair=1, pairs="all",
                             prompts={"one": "{0} in a field", "two": "{1} chasing {0}"}))
    prompts = sorted(s.prompt for s in plan)
    assert "dog in a field" in prompts and "cat in a field" in prompts
    pair = next(s for s in plan if len(s.classes) == 2)
    assert pair.prompt == f"{pair.class_words[1]} chasing {pair.class_words[0]}"


def test_both_orders_of_pairs():
    plan = build_plan(recipe(classes=["dog", "cat"], per_class=0, per_pair=20, pairs="all"))
    orders = Counter(s.classes for s in plan)
    assert set(orders) == {("dog", "cat"), ("cat", "dog")}
    assert "a photograph of a dog and a cat" in {s.prompt for s in plan}
    assert "a photograph of a cat and a dog" in {s.prompt for s in plan}


def test_sample_seeds_unique_and_int63():
    plan = build_plan(recipe(per_class=5, per_pair=1, pairs="all"))
    seeds = [s.seed for s in plan]
    assert len(plan) == 100 + 190
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(seed, int) and 0 <= seed < 2**63 for seed in seeds)


# ------------------------------------------------------------------- pair files

def test_pairs_file_restricts_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# vocabulary: voc\n# source: test\n"
                    "cat\tdog\t7\n"
                    "bus\tperson\t3\n"           # person is not selected: skipped
                    "pottedplant\tcat\t1\n")
    plan = build_plan(recipe(classes=FOUR, per_class=0, per_pair=3, pairs=str(path)))
    pairs = Counter(frozenset(s.classes) for s in plan)
    assert pairs == {frozenset(("cat", "dog")): 3, frozenset(("cat", "pottedplant")): 3}


def test_pairs_file_without_usable_pair(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("bus\tperson\n")
    with pytest.raises(RecipeError, match="no pair") as info:
        build_plan(recipe(classes=FOUR, per_class=1, per_pair=1, pairs=str(path)))
    assert "\n" not in str(info.value)


def test_pairs_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="pairs file not found"):
        build_plan(recipe(classes=FOUR, per_pair=1, pairs=str(tmp_path / "missing.tsv")))
    path = tmp_path / "bad.tsv"
    path.write_text("cat\tunicorn\n")
    with pytest.raises(RecipeError, match=r"bad\.tsv:1"):
        build_plan(recipe(classes=FOUR, per_pair=1, pairs=str(path)))


# ----------------------------------------------------------------- prompt files

def test_prompt_file_with_braces(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# complicated prompts\n\n"
                    "a photograph of a {bus} crossing a busy street\n"
                    "a {potted plant} on a windowsill and a {cat} asleep\n")
    plan = build_plan(recipe(classes=["bus", "dog"], per_class=4, prompts={"file": str(path)}))
    buses = [s for s in plan if s.classes == ("bus",)]
    dogs = [s for s in plan if s.classes == ("dog",)]
    assert len(buses) == 4 and len(dogs) == 4
    for s in buses:
        assert s.prompt == "a photograph of a bus crossing a busy street"
        assert s.class_words == ("bus",)
    for s in dogs:  # no hand-written prompt: the template
        assert s.prompt == "a photograph of a dog"


def test_prompt_file_parsing(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a {potted plant} on a windowsill and a {Cat} asleep\n")
    (prompt,) = load_prompt_file(path, VOC)
    assert prompt.text == "a potted plant on a windowsill and a Cat asleep"
    assert prompt.classes == ("pottedplant", "cat") and prompt.words == ("potted plant", "Cat")


def test_prompt_file_pair_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a {cat} sleeping on a {dog}\n")
    plan = build_plan(recipe(classes=["dog", "cat"], per_class=1, per_pair=3, pairs="all",
                             prompts={"file": str(path)}))
    doubles = [s for s in plan if len(s.classes) == 2]
    assert len(doubles) == 3
    assert all(s.prompt == "a cat sleeping on a dog" and s.classes == ("cat", "dog") for s in doubles)


def test_prompt_file_unknown_class(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photograph of a {bus}\n# comment\na {unicorn} in a field\n")
    with pytest.raises(RecipeError) as info:
        build_plan(recipe(classes=["bus"], prompts={"file": str(path)}))
    message = str(info.value)
    assert f"{path}:3" in message and "unicorn" in message and "\n" not in message


def test_prompt_file_line_without_braces(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photograph of a bus\n")
    with pytest.raises(RecipeError, match=r"prompts\.txt:1: no class in braces"):
        build_plan(recipe(classes=["bus"], prompts={"file": str(path)}))


def test_prompt_file_missing(tmp_path):
    with pytest.raises(RecipeError, match="prompts file not found"):
        build_plan(recipe(classes=["bus"], prompts={"file": str(tmp_path / "nope.txt")}))


# ------------------------------------------------------------------------ splits

def test_seen_split_excludes_unseen_classes():
    unseen = {"tvmonitor", "car", "dog", "sofa", "train"}
    r = recipe(classes="seen", split=1, per_class=2)
    assert set(r.selected_classes) == set(VOC.names) - unseen
    plan = build_plan(r)
    assert len(plan) == 30
    assert not {name for s in plan for name in s.classes} & unseen
    assert {name for s in plan for name in s.classes} == set(VOC.names) - unseen


def test_unseen_split_with_pairs():
    plan = build_plan(recipe(classes="unseen", split=1, per_class=1, per_pair=1, pairs="all"))
    assert {name for s in plan for name in s.classes} == {"tvmonitor", "car", "dog", "sofa", "train"}
    assert len(plan) == 5 + 10


def test_prompt_file_with_too_many_classes(tmp_path):
    path = tmp_path / "crowded.txt"
    names = ["dog", "cat", "bus", "car", "cow", "sheep", "horse", "bird", "boat"]
    path.write_text("a photograph of " + " and ".join(f"{{{n}}}" for n in names) + "\n")
    with pytest.raises(RecipeError, match="at most 8"):
        build_plan(load_recipe("tiny", {"prompts": {"file": str(path)}}))


# ------------------------------------------------------------------ user-defined vocabularies, prompts per class

def test_per_class_templates_join_the_classes_prompts():
    r = recipe(classes=["dog", "cat"], per_class=40,
               prompts={"per_class": {"dog": ["a {} asleep on a sofa", "a wet {} on a beach"]}})
    plan = build_plan(r)
    dogs = Counter(s.prompt for s in plan if s.classes == ("dog",))
    assert set(dogs) == {"a dog asleep on a sofa", "a wet dog on a beach"} and min(dogs.values()) >= 10
    assert {s.prompt for s in plan if s.classes == ("cat",)} == {"a photograph of a cat"}  # the template
    assert all(s.class_words == s.classes for s in plan)  # each prompt's class word, for the token locator
    assert as_tuples(build_plan(r)) == as_tuples(plan)  # the choice is the plan seed's


def test_user_vocabulary_plan_names_its_classes_naturally():
    street = load_recipe("tiny", {"vocabulary": "vocabularies/street.yaml", "classes": "unseen", "split": 1,
                                  "per_pair": 0, "num_samples": None})
    assert [(s.classes, s.class_words, s.prompt) for s in build_plan(street)] == [
        (("cyclist",), ("bicycle",), "a photograph of a bicycle")]


def test_pairs_from_the_vocabulary():
    signs = dict(vocabulary={"name": "signs", "pairs": [["stop", "light"]], "classes": [
        {"name": "stop", "detector": "stop sign"}, {"name": "light", "detector": "traffic light"},
        {"name": "hydrant", "detector": "fire hydrant"}]})
    plan = build_plan(recipe(**signs, per_class=0, per_pair=3, pairs="vocabulary"))
    assert Counter(frozenset(s.classes) for s in plan) == {frozenset({"stop", "light"}): 3}
    with pytest.raises(RecipeError, match="vocabulary signs has no pair whose classes are both selected"):
        build_plan(recipe(**signs, classes=["stop", "hydrant"], per_pair=1, pairs="vocabulary"))

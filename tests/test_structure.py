"""The package's structure: libraries never import commands or test helpers, the core never
imports nnU-Net, and every trainer name the documentation gives resolves through nnU-Net's own
trainer lookup (``nnUNetv2_train -tr NAME``), every link between the Markdown documents
leads to a file and heading that exist, and CI sets up and tests as the README says."""
import ast
import functools
import os
import re

import pytest

import helpers as T

PACKAGE = os.path.join(T.REPO_ROOT, "nnunet_guide")

#: trainer class names that exist (or existed) and that users may have trained models with
TRAINERS = (
    "nnUNetTrainerExtraChannels", "nnUNetTrainerGuide", "nnUNetTrainerGuideExpDistance", "nnUNetTrainerGuideBall",
    "nnUNetTrainerGuideOriginal", "nnUNetTrainerGuideInterior", "nnUNetTrainerGuideRandomClick",
    "nnUNetTrainerGuideAlways", "nnUNetTrainerGuideDrop80", "nnUNetTrainerGuideCorrection", "nnUNetTrainerGuideTumor",
    "nnUNetTrainerGuideTumorCorrection", "nnUNetTrainerGuidePrompts", "nnUNetTrainerGuideTumorPrompts",
    "nnUNetTrainerGuidePromptsCorrection",
    "nnUNetTrainerGuideShort", "nnUNetTrainerShort", "nnUNetTrainerGuideCorrectionShort",
    "nnUNetTrainerGuideTumorShort", "nnUNetTrainerGuideTumorCorrectionShort", "nnUNetTrainerGuideTumorPromptsShort",
    "nnUNetTrainerDensity", "nnUNetTrainerGuideDensity", "nnUNetTrainerGuideDensityFiLM", "nnUNetTrainerDensityFiLM",
    "nnUNetTrainerDensityNoTexture", "nnUNetTrainerGuideDensityNoTexture", "nnUNetTrainerDensityShort",
    "nnUNetTrainerGuideDensityShort", "nnUNetTrainerGuideDensityFiLMShort",
)
#: names the README uses for a user's own subclass (examples, not shipped)
EXAMPLES = {"nnUNetTrainerGuideTumourOnly", "nnUNetTrainerGuide_100epochs"}


def package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, T.REPO_ROOT)[:-3].split(os.sep)
                yield path, ".".join(rel[:-1] if rel[-1] == "__init__" else rel), rel[-1] == "__init__"


def imported_modules(path, module, is_package):
    """Absolute names of every module an import statement of ``path`` names (relative imports
    resolved; ``from X import y`` gives X and X.y, since y may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name
            yield from (f"{name}.{a.name}" for a in node.names)


def test_no_library_imports_a_command_or_a_test_helper():
    bad = []
    for path, module, is_package in package_modules():
        is_command = module == "nnunet_guide.cli" or module.startswith("nnunet_guide.cli.")
        for name in imported_modules(path, module, is_package):
            if name == "nnunet_guide.testing" or name.split(".")[0] in ("testing", "helpers", "tests") \
                    or name.startswith("nnunet_guide.testing."):
                bad.append(f"{module} imports test helper {name}")
            if not is_command and (name == "nnunet_guide.cli" or name.startswith("nnunet_guide.cli.")):
                bad.append(f"library {module} imports command module {name}")
    assert not bad, "\n".join(bad)


def test_the_core_and_the_settings_never_import_nnunet():
    bad = []
    for path, module, is_package in package_modules():
        if module.startswith("nnunet_guide.core") or module in ("nnunet_guide.settings", "nnunet_guide.paths"):
            bad += [f"{module} imports {n}" for n in imported_modules(path, module, is_package)
                    if n.split(".")[0] in ("nnunetv2", "batchgeneratorsv2", "dynamic_network_architectures")]
    assert not bad, "\n".join(bad)


def test_every_command_is_a_cli_module_with_a_main():
    import importlib
    scripts = T.console_scripts()
    assert set(scripts) == {"nnUNetv2_guide_env", "nnUNetv2_guide_plan", "nnUNetv2_predict_guided",
                            "nnUNetv2_guide_evaluate", "nnUNetv2_guide_demo", "nnUNetv2_guide_convert_lits",
                            "nnUNetv2_guide_server"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module.startswith("nnunet_guide.cli."), f"{name}: {target} is not under nnunet_guide/cli/"
        assert callable(getattr(importlib.import_module(module), func)), name


def documentation_files():
    """README.md and every Markdown file under docs/."""
    docs = os.path.join(T.REPO_ROOT, "docs")
    return [os.path.join(T.REPO_ROOT, "README.md")] + [os.path.join(docs, f) for f in sorted(os.listdir(docs))
                                                      if f.endswith(".md")]


def documented_trainer_names():
    names = set()
    for text in (open(path).read() for path in documentation_files()):
        # a model folder (TRAINER__PLANS__CONFIGURATION) names its trainer first
        names |= {m.split("__")[0] for m in re.findall(r"nnUNetTrainer\w*", text)}
    return sorted(names - EXAMPLES - {"nnUNetTrainer"})


@functools.lru_cache(maxsize=None)
def markdown_anchors(path):
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2`` for repeats; lines inside code fences are not headings."""
    anchors, seen, fence = set(), {}, False
    for line in open(path):
        if line.lstrip().startswith("```"):
            fence = not fence
        heading = None if fence else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(paths):
    """Relative links ``[text](file#anchor)`` of the Markdown files ``paths`` whose file or heading
    does not exist, as (file, link, why)."""
    broken = []
    for path in paths:
        for link in re.findall(r"\]\(([^)\s]+)\)", open(path).read()):
            if re.match(r"[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if not os.path.exists(target):
                broken.append((path, link, "no such file"))
            elif anchor and target.endswith(".md") and anchor not in markdown_anchors(target):
                broken.append((path, link, "no such heading"))
    return broken


def test_every_documentation_link_leads_to_a_file_and_heading_that_exist():
    assert not broken_links(documentation_files())


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## What +0.10 Dice means (LiTS)\n\n```\n# not a heading\n```\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#what-010-dice-means-lits) [b](other.md#title) [c](#local) [d](https://x.org/#y)\n"
                   "[e](gone.md) [f](other.md#not-a-heading) [g](#nowhere)\n\n## Local\n")
    assert broken_links([str(doc)]) == [(str(doc), "gone.md", "no such file"),
                                        (str(doc), "other.md#not-a-heading", "no such heading"),
                                        (str(doc), "#nowhere", "no such heading")]


def test_the_documentation_names_only_trainers_that_exist():
    import nnunet_guide.trainers as trainers
    assert set(TRAINERS) <= set(trainers.__all__)
    missing = [n for n in documented_trainer_names() if n not in trainers.__all__]
    assert not missing, f"documented but not shipped: {missing}"


@pytest.mark.parametrize("name", sorted(set(TRAINERS) | set(documented_trainer_names())))
def test_every_trainer_name_resolves_through_nnunets_lookup(name, monkeypatch):
    """What ``nnUNetv2_train -tr NAME`` and prediction from a model folder do: nnU-Net's search,
    here through the folder ``nnUNetv2_guide_env`` registers (nnunet_guide/_ext_trainers)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import nnunet_guide.trainers as trainers
    from nnunet_guide.paths import ext_trainer_folder
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_folder())
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(trainers, name)


def test_interior_and_random_click_trainers_do_what_their_names_say():
    from nnunet_guide.trainers import nnUNetTrainerGuideInterior, nnUNetTrainerGuideRandomClick
    assert nnUNetTrainerGuideInterior.guide_settings.click_policy == "interior"
    assert nnUNetTrainerGuideRandomClick.guide_settings.click_policy == "random"


def test_the_network_wrapper_keeps_its_former_name():
    from nnunet_guide.network import ExtraChannelNetwork, GuidedNetwork
    assert GuidedNetwork is ExtraChannelNetwork


def readme_block(heading: str) -> list:
    """The command lines of the first ```bash block under a README heading."""
    with open(os.path.join(T.REPO_ROOT, "README.md")) as f:
        text = f.read()
    section = text.split(f"\n## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_the_readmes_set_up_and_test_commands_verbatim():
    """CI's clean clone must be set up exactly as a user is told to (a missing step shows up there)."""
    with open(os.path.join(T.REPO_ROOT, ".ci", "run")) as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    setup, tests = readme_block("Set up"), readme_block("Tests")
    assert setup and tests == ["python -m pytest -q tests"]
    assert [ln for ln in ci if ln in setup + tests] == setup + tests, (ci, setup, tests)

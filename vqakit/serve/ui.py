"""The web UI (Gradio), mounted at ``/ui`` by ``create_app(..., ui=True)`` and run by ``vqakit demo``.

Upload an image (or pick an example), ask a question, and see the answer, the top-5 answers with their
scores and the question->image attention heatmap (classifier checkpoints; a generative checkpoint shows
its generated answer and its probability, and no heatmap). It calls the same ``VQAService`` as the REST routes
(same checks, same micro-batcher), so the page and the API cannot answer differently.
"""

from __future__ import annotations

import gradio as gr

from vqakit.serve.sources import RequestError
from vqakit.inference.visualize import heatmap_overlay

# system fonts: the default theme would ask Google Fonts, which an offline browser waits for
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def build_ui(service, examples: list[list[str]] | None = None) -> gr.Blocks:
    """The page over ``service`` (a ``VQAService``); ``examples``: ``[image path, question]`` pairs to pick from."""

    async def ask(image, question):
        if image is None:
            raise gr.Error("Upload an image (or pick an example) first.")
        try:
            questions = service.check_questions([question or ""])
            predictions, decoded, _ = await service.run(image, questions, top_k=5, heatmap=service.heatmaps)
        except RequestError as err:
            raise gr.Error(err.message) from err
        p = predictions[0]
        overlay = heatmap_overlay(decoded, p.attention) if p.attention is not None else None
        return f"### {p.answer}\nscore {p.score:.3f}", dict(p.top_k), overlay

    with gr.Blocks(title="vqakit", analytics_enabled=False) as ui:
        gr.Markdown("# vqakit: visual question answering\nUpload an image or pick an example, then ask a question "
                    "about it. The heatmap shows where the model's fusion layers looked.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"], height=300,
                                 elem_id="vqa-image")
                question = gr.Textbox(label="question", placeholder="what shape is in the image?",
                                      max_length=service.config.max_question_chars, elem_id="vqa-question")
                button = gr.Button("Ask", variant="primary", elem_id="vqa-ask")
            with gr.Column():
                answer = gr.Markdown(elem_id="vqa-answer")
                top5 = gr.Label(num_top_classes=5, label="top-5 answers", elem_id="vqa-top5")
                heatmap = gr.Image(label="attention heatmap", interactive=False, height=300, elem_id="vqa-heatmap")
        if examples:
            gr.Examples(examples=examples, inputs=[image, question], label="examples")
        for event in (button.click, question.submit):
            event(ask, [image, question], [answer, top5, heatmap], api_name=False)
    return ui

"""Merge-field rendering with Django's template engine.

Messages are templates (`Hello {{ first_name }}`); recipients carry the merge data. A missing
field renders empty; HTML bodies are autoescaped, text bodies are not.
"""

from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.template import Context, Engine, Template, TemplateSyntaxError


def _engine(*, autoescape: bool) -> Engine:
    # debug=True makes syntax errors carry the line they stand on; string_if_invalid="" keeps a
    # missing merge field empty. No loaders: message bodies cannot include files.
    return Engine(debug=True, autoescape=autoescape, string_if_invalid="", builtins=[], loaders=[])


def compile_template(source: str, *, html: bool, field: str) -> Template:
    """Compile a body, turning a syntax error into a ValidationError that names the line."""
    try:
        return _engine(autoescape=html).from_string(source)
    except TemplateSyntaxError as exc:
        info = getattr(exc, "template_debug", None)
        where = f"line {info['line']}: " if info else ""
        raise ValidationError({field: f"Template error on {where}{exc}"}) from exc


@dataclass(frozen=True)
class CompiledMessage:
    subject: Template
    text: Template | None
    html: Template | None

    def render(self, merge_data: dict) -> tuple[str, str, str]:
        # Plain str, not the engine's SafeString: whoever shows a rendered body must escape it.
        context = Context(merge_data, autoescape=False)
        subject = str(self.subject.render(context)).strip()
        text = str(self.text.render(context)) if self.text else ""
        html = str(self.html.render(Context(merge_data))) if self.html else ""
        return subject, text, html


def compile_message(*, subject: str, text_body: str, html_body: str) -> CompiledMessage:
    errors: dict[str, list] = {}
    compiled = {}
    for field, source, html in (
        ("subject", subject, False),
        ("text_body", text_body, False),
        ("html_body", html_body, True),
    ):
        if not source:
            compiled[field] = None
            continue
        try:
            compiled[field] = compile_template(source, html=html, field=field)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    if errors:
        raise ValidationError(errors)
    return CompiledMessage(compiled["subject"], compiled["text_body"], compiled["html_body"])

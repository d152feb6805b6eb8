"""Staff groups: Support runs customers and messages; Operators watch and tune send limits."""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations

SUPPORT = "Support"
OPERATORS = "Operators"

CRUD = ("add", "change", "view", "delete")


def _support_permissions():
    managed = {"customers": ("customer", "suppression"), "sending": ("message", "recipient")}
    support = {
        (app, f"{action}_{model}")
        for app, models in managed.items()
        for model in models
        for action in CRUD
    }
    support |= {
        ("customers", "view_provideraccount"),
        ("customers", "view_sendlimit"),
        ("sending", "start_message"),
        ("sending", "cancel_message"),
    }
    return support


def add_groups(apps, schema_editor):
    alias = schema_editor.connection.alias
    # On a fresh database permissions are created only after every migration has run
    # (post_migrate); create the ones these groups need now, from the migration state.
    for label in ("customers", "sending"):
        create_permissions(global_apps.get_app_config(label), apps=apps, using=alias, verbosity=0)

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")

    def permissions(pairs):
        wanted = set(pairs)
        found = [
            p
            for p in Permission.objects.using(alias)
            .filter(content_type__app_label__in={app for app, _ in wanted})
            .select_related("content_type")
            if (p.content_type.app_label, p.codename) in wanted
        ]
        missing = wanted - {(p.content_type.app_label, p.codename) for p in found}
        if missing:
            raise RuntimeError(f"Permissions missing: {sorted(missing)}")
        return found

    support, _ = Group.objects.using(alias).get_or_create(name=SUPPORT)
    support.permissions.add(*permissions(_support_permissions()))

    operators, _ = Group.objects.using(alias).get_or_create(name=OPERATORS)
    view_everything = Permission.objects.using(alias).filter(
        content_type__app_label__in=("customers", "sending"), codename__startswith="view_"
    )
    operators.permissions.add(
        *view_everything,
        *permissions(
            {
                ("customers", "change_sendlimit"),
                ("sending", "pause_message"),
                ("sending", "resume_message"),
            }
        ),
    )


def remove_groups(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Group.objects.using(schema_editor.connection.alias).filter(
        name__in=(SUPPORT, OPERATORS)
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("customers", "0001_initial"),
        ("sending", "0001_initial"),
        # Operators view everything: the workers, leases and minutes too.
        ("sending", "0002_workers_leases_minutes"),
    ]

    operations = [migrations.RunPython(add_groups, remove_groups)]

"""Exporting delivery logs is a permission of its own (sending.export_recipients): Support, who
answer customers' questions about their sends, get it; Operators (who view everything) do not."""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations

SUPPORT = "Support"


def grant(apps, schema_editor):
    alias = schema_editor.connection.alias
    # On a fresh database permissions are created only after every migration (post_migrate).
    create_permissions(global_apps.get_app_config("sending"), apps=apps, using=alias, verbosity=0)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    export = Permission.objects.using(alias).get(
        content_type__app_label="sending", codename="export_recipients"
    )
    support, _ = Group.objects.using(alias).get_or_create(name=SUPPORT)
    support.permissions.add(export)


def revoke(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    alias = schema_editor.connection.alias
    export = Permission.objects.using(alias).filter(
        content_type__app_label="sending", codename="export_recipients"
    )
    for group in Group.objects.using(alias).filter(name=SUPPORT):
        group.permissions.remove(*export)


class Migration(migrations.Migration):
    dependencies = [
        ("customers", "0004_provider_account_credentials_ref_and_history"),
        ("sending", "0007_recipient_export_permission"),
    ]

    operations = [migrations.RunPython(grant, revoke)]

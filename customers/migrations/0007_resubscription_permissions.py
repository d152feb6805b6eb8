"""Support and Operators may read the resubscribe audit (customers.view_resubscription)."""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUPS = ("Support", "Operators")


def grant(apps, schema_editor):
    alias = schema_editor.connection.alias
    create_permissions(global_apps.get_app_config("customers"), apps=apps, using=alias, verbosity=0)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    view = Permission.objects.using(alias).get(
        content_type__app_label="customers", codename="view_resubscription"
    )
    for group in Group.objects.using(alias).filter(name__in=GROUPS):
        group.permissions.add(view)


class Migration(migrations.Migration):
    dependencies = [("customers", "0006_halt_thresholds_resubscription")]

    operations = [migrations.RunPython(grant, migrations.RunPython.noop)]

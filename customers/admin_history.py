"""The admin of models whose history django-simple-history keeps (send limits, provider
accounts): its history pages under the site's Content-Security-Policy, and a revert only for
those who may change the object."""

from django.core.exceptions import PermissionDenied
from simple_history.admin import SimpleHistoryAdmin


class AuditedAdmin(SimpleHistoryAdmin):
    history_list_per_page = 50

    def history_view(self, request, object_id, extra_context=None):
        response = super().history_view(request, object_id, extra_context)
        # django-simple-history's list of versions styles its paginator with a style="…"
        # attribute: allowed here (attributes only, never <style> or script), the one exception
        # to the site's policy.
        response._csp_update = {"style-src-attr": ["'unsafe-inline'"]}
        return response

    def history_form_view(self, request, object_id, version_id, extra_context=None):
        # simple_history saves a revert posted by anyone who may *view* the history; a revert
        # is a change.
        if request.method == "POST":
            obj = self.get_object(request, object_id)
            if obj is None or not self.has_change_permission(request, obj):
                raise PermissionDenied
        return super().history_form_view(request, object_id, version_id, extra_context)

/* django-celery-beat's periodic task form: the chosen crontab, in words, under its field (the
   package's inline script, as a static file for the site's Content-Security-Policy). */
(function () {
  "use strict";
  var $ = django.jQuery;
  var script = document.getElementById("periodic-task-overrides");
  var readableCrontabs = JSON.parse($("#readable-crontabs").text());
  var originalCrontabHelp = script.dataset.crontabHelp || "";

  function updateCrontabHelp(additional) {
    var help = $(".field-crontab .help");
    help.text(originalCrontabHelp);
    help.append("<br>", document.createTextNode("Translation: " + additional));
  }

  $(".field-crontab_translation").hide();
  $(".field-crontab").change(function () {
    updateCrontabHelp(readableCrontabs[$("#id_crontab").val()]);
  });
})();

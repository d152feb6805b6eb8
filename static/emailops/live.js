/* The live pages: draw the snapshot the page was served with, then append what the websocket
   brings. No inline script: the numbers come in a JSON data block (#live-snapshot), the page's
   settings in data- attributes. Chart times are in the customer's time zone; hovering shows UTC.
   Every chart has a table view of the same numbers. window.emailopsLive exposes the charts'
   data (the browser tests compare it with the database). */
(function () {
  "use strict";

  var root = document.querySelector("[data-live]");
  if (!root) {
    return;
  }
  var kind = root.dataset.live;
  var tz = root.dataset.timeZone || "UTC";
  var snapshotEl = document.getElementById("live-snapshot");
  var snap = snapshotEl ? JSON.parse(snapshotEl.textContent) : {};
  var state = { kind: kind, snapshot: snap, charts: {}, samples: 0, closeCode: null };
  window.emailopsLive = state;

  // --- formatting ---------------------------------------------------------------------------

  function formatter(options, zone) {
    return new Intl.DateTimeFormat("en-GB", Object.assign({ timeZone: zone, hour12: false }, options));
  }
  var fmtSecond = formatter({ hour: "2-digit", minute: "2-digit", second: "2-digit" }, tz);
  var fmtMinute = formatter(
    { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }, tz);
  var fmtUtc = formatter(
    { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      second: "2-digit" }, "UTC");

  function utc(ms) {
    return fmtUtc.format(new Date(ms)) + " UTC";
  }

  function duration(s) {
    if (s === null || s === undefined) {
      return "—";
    }
    s = Math.round(s);
    if (s < 60) {
      return s + " s";
    }
    if (s < 3600) {
      return Math.floor(s / 60) + " min " + (s % 60) + " s";
    }
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function text(el, value) {
    if (el && el.textContent !== String(value)) {
      el.textContent = value;
    }
  }

  function field(name, scope) {
    return (scope || root).querySelector('[data-field="' + name + '"]');
  }

  function setConnection(value) {
    text(document.getElementById("live-connection"), value);
  }

  // --- charts -------------------------------------------------------------------------------

  function width(el) {
    return Math.max(300, el.clientWidth || 600);
  }

  function tzDate(ts) {
    return uPlot.tzDate(new Date(ts * 1000), tz);
  }

  function annotationsPlugin() {
    return {
      hooks: {
        draw: [function (u) {
          var notes = (state.snapshot.annotations || []);
          var ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#b45309";
          ctx.fillStyle = "#b45309";
          ctx.setLineDash([4, 4]);
          ctx.font = 12 * uPlot.pxRatio + "px sans-serif";
          notes.forEach(function (note, i) {
            var x = note.t / 1000;
            if (x < u.scales.x.min || x > u.scales.x.max) {
              return;
            }
            var px = Math.round(u.valToPos(x, "x", true));
            ctx.beginPath();
            ctx.moveTo(px, u.bbox.top);
            ctx.lineTo(px, u.bbox.top + u.bbox.height);
            ctx.stroke();
            // Staggered, so that changes made close together stay readable.
            ctx.fillText(note.text, px + 4, u.bbox.top + (12 + 14 * (i % 3)) * uPlot.pxRatio);
          });
          ctx.restore();
        }],
      },
    };
  }

  function makeChart(el, series, data, extra) {
    var opts = Object.assign({
      width: width(el),
      height: 220,
      tzDate: tzDate,
      series: [{ label: "UTC", value: function (u, v) { return v === null ? "—" : utc(v * 1000); } }]
        .concat(series),
      axes: [{}, { size: 60 }],
      plugins: [annotationsPlugin()],
    }, extra || {});
    var chart = new uPlot(opts, data, el);
    window.addEventListener("resize", function () {
      chart.setSize({ width: width(el), height: 220 });
    });
    return chart;
  }

  // The message page draws no chart and loads no uPlot.
  var plots = typeof uPlot !== "undefined";
  var bars = plots ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined;
  var stepped = plots ? uPlot.paths.stepped({ align: 1 }) : undefined;

  // --- the customer page --------------------------------------------------------------------

  function customerPage() {
    var windowS = (snap.window_ms || 60000) / 1000;
    var seconds = (snap.seconds || []).slice();
    var minutes = (snap.minutes || []).slice();
    var sample = snap.sample || null;

    function capAt(tSeconds) {
      var start = Math.floor(tSeconds / windowS) * windowS * 1000;
      for (var i = minutes.length - 1; i >= 0; i--) {
        if (minutes[i].t === start && minutes[i].cap) {
          return minutes[i].cap;
        }
        if (minutes[i].t < start) {
          break;
        }
      }
      return sample ? sample.limits.per_minute : null;
    }

    function secondsData() {
      var xs = [], sends = [], caps = [];
      seconds.forEach(function (p) {
        xs.push(p[0]);
        sends.push(p[1]);
        var cap = capAt(p[0]);
        caps.push(cap === null ? null : Math.round((cap / windowS) * 100) / 100);
      });
      return [xs, sends, caps];
    }

    function workersData() {
      var max = sample ? sample.limits.max_workers : null;
      return [
        seconds.map(function (p) { return p[0]; }),
        seconds.map(function (p) { return p[2]; }),
        seconds.map(function () { return max; }),
      ];
    }

    function minutesData() {
      return [
        minutes.map(function (m) { return m.t / 1000; }),
        minutes.map(function (m) { return m.granted - m.refunded + m.carried_in; }),
        minutes.map(function (m) { return m.sent; }),
        minutes.map(function (m) { return m.cap; }),
        minutes.map(function (m) { return m.failed ? m.failed : null; }),
        minutes.map(function (m) { return m.throttled ? m.throttled : null; }),
      ];
    }

    var charts = state.charts;
    charts.seconds = makeChart(document.getElementById("chart-seconds"), [
      { label: "Sends/s", stroke: "#2563eb", fill: "rgba(37,99,235,0.15)", paths: stepped },
      { label: "Cap/s", stroke: "#dc2626", dash: [6, 4] },
    ], secondsData());
    // Charged (granted, less refunds, plus sends carried in) moves as batches are granted;
    // sent moves as they are reported.
    charts.minutes = makeChart(document.getElementById("chart-minutes"), [
      { label: "Charged", stroke: "#93c5fd", fill: "rgba(147,197,253,0.45)", paths: bars,
        points: { show: false } },
      { label: "Sent", stroke: "#2563eb", fill: "rgba(37,99,235,0.7)", paths: bars,
        points: { show: false } },
      { label: "Cap", stroke: "#dc2626", dash: [6, 4], paths: stepped, points: { show: false } },
      { label: "Failed", stroke: "#7c3aed", width: 0,
        points: { show: true, size: 8, fill: "#7c3aed" } },
      { label: "Throttled", stroke: "#f59e0b", width: 0,
        points: { show: true, size: 8, fill: "#f59e0b" } },
    ], minutesData());
    charts.workers = makeChart(document.getElementById("chart-workers"), [
      { label: "Workers", stroke: "#059669", fill: "rgba(5,150,105,0.15)", paths: stepped },
      { label: "Max workers", stroke: "#6b7280", dash: [6, 4] },
    ], workersData());
    // Open on the last hour of the 24 hours kept; drag to zoom, double-click for all of it.
    if (minutes.length) {
      var last = minutes[minutes.length - 1].t / 1000 + windowS;
      charts.minutes.setScale("x", { min: last - 60 * windowS, max: last });
    }

    // Table views: the same numbers, drawn when opened.
    function fill(name, rows) {
      var details = root.querySelector('details[data-table="' + name + '"]');
      if (!details || !details.open) {
        return;
      }
      var body = details.querySelector("tbody");
      var frag = document.createDocumentFragment();
      rows.forEach(function (cells) {
        var tr = document.createElement("tr");
        cells.forEach(function (cell, i) {
          var td = document.createElement(i === 0 ? "th" : "td");
          if (i === 0) {
            td.scope = "row";
          }
          td.textContent = cell;
          tr.appendChild(td);
        });
        frag.appendChild(tr);
      });
      body.replaceChildren(frag);
    }

    function tables() {
      var recent = seconds.slice().reverse();
      fill("seconds", recent.map(function (p) {
        return [fmtSecond.format(new Date(p[0] * 1000)), p[1], p[2]];
      }));
      fill("workers", recent.map(function (p) {
        return [fmtSecond.format(new Date(p[0] * 1000)), p[2]];
      }));
      fill("minutes", minutes.slice().reverse().map(function (m) {
        return [fmtMinute.format(new Date(m.t)), m.cap, m.granted, m.refunded, m.carried_in,
          m.sent, m.failed, m.throttled];
      }));
    }
    root.querySelectorAll("details.table-view").forEach(function (d) {
      d.addEventListener("toggle", tables);
    });
    var tablesDue = 0;

    function redraw() {
      charts.seconds.setData(secondsData(), false);
      charts.workers.setData(workersData(), false);
      charts.minutes.setData(minutesData(), false);
      var now = Date.now();
      if (now >= tablesDue) {
        tablesDue = now + 1000;
        tables();
      }
    }

    function upsertMinute(row) {
      for (var i = minutes.length - 1; i >= 0; i--) {
        if (minutes[i].t === row.t) {
          minutes[i] = row;
          return;
        }
        if (minutes[i].t < row.t) {
          break;
        }
      }
      if (row.granted || row.sent || row.throttled || row.carried_in || minutes.length) {
        minutes.push(row);
        minutes.sort(function (a, b) { return a.t - b.t; });
      }
      var since = row.t - 24 * 3600 * 1000;
      while (minutes.length && minutes[0].t < since) {
        minutes.shift();
      }
    }

    function showSample(s) {
      sample = s;
      var point = s.point;
      var lastPoint = seconds[seconds.length - 1];
      if (lastPoint && lastPoint[0] === point[0]) {
        seconds[seconds.length - 1] = point;
      } else if (!lastPoint || lastPoint[0] < point[0]) {
        seconds.push(point);
      }
      while (seconds.length && seconds[0][0] <= point[0] - 600) {
        seconds.shift();
      }
      if (s.previous.granted || s.previous.sent) {
        upsertMinute(s.previous);
      }
      upsertMinute(s.minute);
      redraw();
      facts(s);
    }

    function facts(s) {
      var limits = s.limits;
      text(field("per_minute"), limits.per_minute + (limits.paused ? " (paused)" : ""));
      text(field("workers"), s.workers);
      text(field("max_workers"), limits.max_workers);
      text(field("rate"), s.rate_per_s);
      text(field("eta"), duration(s.eta_s));
      var beat = s.conductor.heartbeat;
      text(field("conductor"), beat ? "last tick " + fmtSecond.format(new Date(beat)) +
        (s.conductor.holder ? ", chain " + s.conductor.holder.slice(0, 8) : ", idle") :
        "not running");
      var m = s.minute;
      Object.keys(m).forEach(function (key) {
        text(root.querySelector('[data-budget="' + key + '"]'), m[key]);
      });
      var cap = Math.max(m.cap, 1);
      var gauge = document.getElementById("live-gauge");
      if (gauge) {
        // Widths through the CSSOM: allowed by the page's style-src 'self', unlike style="…".
        gauge.querySelector(".gauge-sent").style.width = Math.min(100, (100 * m.sent) / cap) + "%";
        gauge.querySelector(".gauge-flight").style.width =
          Math.min(100, (100 * m.in_flight) / cap) + "%";
        gauge.querySelector(".gauge-refunded").style.width =
          Math.min(100, (100 * m.refunded) / cap) + "%";
        gauge.setAttribute("aria-label", "This minute: " + m.sent + " sent, " + m.in_flight +
          " in flight, " + m.refunded + " refunded, of a cap of " + m.cap);
      }
      messagesTable(s.messages);
      alerts(s.alerts || []);
    }

    function messagesTable(messages) {
      var body = document.querySelector("#live-messages tbody");
      if (!body) {
        return;
      }
      var rows = messages.map(function (m) {
        var tr = document.createElement("tr");
        tr.dataset.message = m.id;
        var link = document.createElement("a");
        link.href = "../../../message/" + m.id + "/change/";
        link.textContent = m.subject;
        var cells = [link, m.status, null, m.done + " of " + m.total, duration(m.eta_s)];
        cells.forEach(function (cell, i) {
          var td = document.createElement("td");
          if (i === 2) {
            var bar = document.createElement("progress");
            bar.max = Math.max(m.total, 1);
            bar.value = m.done;
            td.appendChild(bar);
          } else if (cell instanceof Node) {
            td.appendChild(cell);
          } else {
            td.textContent = cell;
          }
          tr.appendChild(td);
        });
        return tr;
      });
      if (!rows.length) {
        var tr = document.createElement("tr");
        tr.className = "empty";
        var td = document.createElement("td");
        td.colSpan = 5;
        td.textContent = "Nothing sending.";
        tr.appendChild(td);
        rows.push(tr);
      }
      body.replaceChildren.apply(body, rows);
    }

    function alerts(list) {
      var box = document.getElementById("live-alerts");
      if (!box) {
        return;
      }
      box.replaceChildren.apply(box, list.map(function (a) {
        var p = document.createElement("p");
        p.className = "live-alert";
        p.textContent = a.title + ": " + a.text;
        return p;
      }));
    }

    function annotate(note) {
      (state.snapshot.annotations = state.snapshot.annotations || []).push(note);
      var list = document.getElementById("live-annotations");
      if (list) {
        var empty = list.querySelector(".empty");
        if (empty) {
          empty.remove();
        }
        list.appendChild(annotationItem(note));
      }
      redraw();
      charts.seconds.redraw();
      charts.minutes.redraw();
      charts.workers.redraw();
    }

    function annotationItem(note) {
      var li = document.createElement("li");
      li.dataset.t = note.t;
      li.textContent = fmtMinute.format(new Date(note.t)) + " (" + utc(note.t) + "): " +
        (note.who || "system") + " — " + note.text;
      return li;
    }

    // Times the server printed as epoch milliseconds, in the customer's zone.
    root.querySelectorAll("#live-annotations li[data-t]").forEach(function (li) {
      var note = (snap.annotations || []).find(function (n) { return String(n.t) === li.dataset.t; });
      if (note) {
        li.replaceWith(annotationItem(note));
      }
    });
    if (sample) {
      facts(sample);
    }
    tables();

    state.series = function () { return { seconds: seconds, minutes: minutes }; };
    return {
      snapshot: function (s) {
        state.snapshot = s;
        snap = s;
        seconds = (s.seconds || []).slice();
        minutes = (s.minutes || []).slice();
        if (s.sample) {
          showSample(s.sample);
        } else {
          redraw();
        }
      },
      sample: function (s) {
        state.samples += 1;
        showSample(s);
      },
      annotation: annotate,
      idle: function () { setConnection("live · nothing sending now"); },
    };
  }

  // --- the overview page --------------------------------------------------------------------

  function overviewPage() {
    var table = document.getElementById("live-overview");
    var sparks = {};
    var lines = {};

    function spark(row, line) {
      var cell = row.querySelector(".spark");
      var points = line.spark || [];
      var data = [
        points.map(function (p) { return p[0] / 1000; }),
        points.map(function (p) { return p[1]; }),
        points.map(function (p) { return p[2]; }),
      ];
      if (sparks[line.customer]) {
        sparks[line.customer].setData(data);
        return;
      }
      cell.setAttribute("role", "img");
      var windowS = (snap.window_ms || 60000) / 1000;
      sparks[line.customer] = new uPlot({
        width: 160,
        height: 36,
        // The last 30 minutes, however few of them had sends.
        scales: { x: { time: true, range: function () {
          var now = Date.now() / 1000;
          return [now - 30 * windowS, now];
        } } },
        tzDate: tzDate,
        legend: { show: false },
        cursor: { show: false },
        axes: [{ show: false }, { show: false }],
        series: [{}, { stroke: "#2563eb", fill: "rgba(37,99,235,0.3)", paths: bars },
          { stroke: "#dc2626", dash: [3, 3], paths: stepped }],
      }, data, cell);
    }

    function row(line) {
      var tr = table.querySelector('tr[data-customer="' + line.customer + '"]');
      if (!tr) {
        var empty = table.querySelector("tr.empty");
        if (empty) {
          empty.remove();
        }
        tr = document.createElement("tr");
        tr.dataset.customer = line.customer;
        var th = document.createElement("th");
        th.scope = "row";
        var a = document.createElement("a");
        a.href = line.customer + "/";
        a.textContent = line.name || "customer " + line.customer;
        th.appendChild(a);
        tr.appendChild(th);
        ["spark", "utilization", "per_minute", "workers", "rate", "eta", "alerts"]
          .forEach(function (name) {
            var td = document.createElement("td");
            if (name === "spark") {
              td.className = "spark";
            } else {
              td.dataset.field = name;
            }
            tr.appendChild(td);
          });
        table.querySelector("tbody").appendChild(tr);
      }
      return tr;
    }

    function show(line) {
      var previous = lines[line.customer] || {};
      line = Object.assign({}, previous, line);
      if (line.minute) {
        var points = (line.spark || []).slice();
        var at = points.findIndex(function (p) { return p[0] === line.minute.t; });
        var point = [line.minute.t, line.minute.sent, line.minute.cap];
        if (at >= 0) {
          points[at] = point;
        } else {
          points.push(point);
        }
        line.spark = points.slice(-30);
      }
      lines[line.customer] = line;
      var tr = row(line);
      text(field("utilization", tr), line.utilization === null || line.utilization === undefined ?
        "—" : Math.round(line.utilization * 100) + "%");
      text(field("per_minute", tr), line.per_minute + (line.paused ? " (paused)" : ""));
      text(field("workers", tr), (line.workers === undefined ? "—" : line.workers) + " of " +
        line.max_workers);
      text(field("rate", tr), (line.rate_per_s === undefined ? "—" : line.rate_per_s) + "/s");
      text(field("eta", tr), duration(line.eta_s));
      var alerts = (line.alerts || []).map(function (a) { return a.title + ": " + a.text; });
      text(field("alerts", tr), alerts.length ? alerts.join("; ") : "—");
      tr.classList.toggle("has-alert", alerts.length > 0);
      spark(tr, line);
    }

    (snap.customers || []).forEach(show);
    state.lines = lines;
    return {
      snapshot: function (s) {
        state.snapshot = s;
        (s.customers || []).forEach(show);
      },
      line: function (line) {
        state.samples += 1;
        show(line);
      },
      lines: function (lines) {
        lines.forEach(this.line, this);
      },
      idle: function (message) {
        var tr = table.querySelector('tr[data-customer="' + message.customer + '"]');
        if (tr) {
          text(field("eta", tr), "finished");
        }
      },
    };
  }

  // --- the message page: its progress, live -------------------------------------------------

  function messagePage() {
    var id = Number(root.dataset.message);
    var bar = root.querySelector("progress");
    return {
      snapshot: function (s) {
        if (s.sample) {
          this.sample(s.sample);
        }
      },
      sample: function (s) {
        state.samples += 1;
        var m = (s.messages || []).find(function (x) { return x.id === id; });
        if (!m) {
          return;
        }
        bar.max = Math.max(m.total, 1);
        bar.value = m.done;
        text(field("done"), m.done);
        text(field("total"), m.total);
        text(field("eta"), duration(m.eta_s));
      },
      idle: function () { text(field("eta"), "finished: reload for the final counts"); },
    };
  }

  // --- the socket ---------------------------------------------------------------------------

  var page = kind === "customer" ? customerPage() : kind === "overview" ? overviewPage() :
    messagePage();
  var delay = 500;

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + root.dataset.ws);
    state.socket = socket;
    socket.onopen = function () {
      delay = 500;
      setConnection("live");
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      var handle = page[message.type];
      if (handle) {
        handle.call(page, message[message.type] || message);
      }
    };
    socket.onclose = function (event) {
      state.closeCode = event.code;
      if (event.code === 4403) {
        setConnection("disconnected: you may no longer watch this page");
        return;
      }
      setConnection("reconnecting…");
      // A reconnect starts with a fresh snapshot, so nothing missed meanwhile is lost.
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }
  connect();
})();

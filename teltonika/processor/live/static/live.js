// The operator page: a teltonika-live.v1 client on a Leaflet map (no build step).
// Protocol: README.rst, "Live positions". Ordering: the server never sends a position
// older than one it sent; across reconnects this page keeps the newest ts per device
// and ignores anything older, so a marker never moves back (an equal ts replaces).
"use strict";
(function () {
  const SUBPROTOCOL = "teltonika-live.v1";
  const BACKOFF_MAX_MS = 30000;
  const params = new URLSearchParams(location.search);
  const devicesParam = (params.get("devices") || "").split(",").map(s => s.trim()).filter(Boolean);
  const eventParam = params.get("event");
  const state = new Map();          // device -> {label, pos, seen, trail: [[lat, lon, ts]], marker, line, li}
  let config = null, map = null, socket = null, attempt = 0, clockOffset = 0, followed = null;
  let stopped = false;

  const banner = document.getElementById("banner");
  function say(text, kind) { banner.textContent = text; banner.className = "banner " + (kind || ""); }
  function serverNow() { return Date.now() + clockOffset; }
  function learnClock(now) { if (typeof now === "number") clockOffset = now - Date.now(); }

  // -- map ---------------------------------------------------------------------------------
  // A canvas marker: a disc with a wedge pointing along the heading (hollow without a fix).
  L.Canvas.include({
    _updateHeadingMarker: function (layer) {
      if (!this._drawing || layer._empty()) { return; }
      const p = layer._point, ctx = this._ctx, r = layer._radius;
      const a = ((layer.options.heading || 0) - 90) * Math.PI / 180;
      this._layers[layer._leaflet_id] = layer;
      ctx.beginPath();
      ctx.arc(p.x, p.y, r, 0, Math.PI * 2, false);
      ctx.moveTo(p.x + Math.cos(a - 0.5) * r, p.y + Math.sin(a - 0.5) * r);
      ctx.lineTo(p.x + Math.cos(a) * r * 2.2, p.y + Math.sin(a) * r * 2.2);
      ctx.lineTo(p.x + Math.cos(a + 0.5) * r, p.y + Math.sin(a + 0.5) * r);
      this._fillStroke(ctx, layer);
    }
  });
  const HeadingMarker = L.CircleMarker.extend({
    _updatePath: function () { this._renderer._updateHeadingMarker(this); }
  });

  const GridLayer = L.GridLayer.extend({
    createTile: function (coords) {
      const tile = document.createElement("canvas"), size = this.getTileSize();
      tile.width = size.x; tile.height = size.y;
      const ctx = tile.getContext("2d");
      ctx.fillStyle = "#f4f6f8"; ctx.fillRect(0, 0, size.x, size.y);
      ctx.strokeStyle = "#d5dbe1"; ctx.strokeRect(0.5, 0.5, size.x - 1, size.y - 1);
      ctx.fillStyle = "#a3acb6"; ctx.font = "10px sans-serif";
      ctx.fillText(coords.z + "/" + coords.x + "/" + coords.y, 6, 14);
      return tile;
    }
  });

  function startMap() {
    map = L.map("map", { preferCanvas: true, worldCopyJump: true }).setView([20, 0], 2);
    if (config.tiles) {
      L.tileLayer(config.tiles, { maxZoom: 19, attribution: config.attribution }).addTo(map);
    } else {
      new GridLayer({ attribution: "no tiles" }).addTo(map);
    }
  }

  // -- devices -----------------------------------------------------------------------------
  function device(id, label) {
    let d = state.get(id);
    if (!d) {
      d = { id: id, label: label || id, pos: null, seen: null, trail: [], marker: null, line: null, li: null };
      state.set(id, d);
    } else if (label) {
      d.label = label;
    }
    return d;
  }

  function lastHeard(d) {
    const rx = d.pos ? d.pos.rx : null;
    if (d.seen === null) { return rx; }
    return rx === null ? d.seen : Math.max(d.seen, rx);
  }

  function stateOf(d, now) {
    const heard = lastHeard(d);
    if (heard === null) { return "offline"; }
    const age = now - heard;
    if (age < config.stale_after_ms) { return "live"; }
    if (age < config.offline_after_ms) { return "stale"; }
    return "offline";
  }

  const COLORS = { live: "#1f9d3a", stale: "#e0a100", offline: "#8c949c" };

  function place(d, pos) {
    // The newest ts wins: anything older (a late record, a replay after a reconnect)
    // never moves the marker back. An equal ts replaces what is shown: the server sends
    // one only for a record that is later by the processor's rule (an event record after
    // the periodic record of the same second) or to repeat it after a reconnect, so the
    // page ends on the record the server calls the latest; it is not a new trail point.
    if (d.pos && pos.ts < d.pos.ts) { return false; }
    const same = d.pos && pos.ts === d.pos.ts;
    d.pos = pos;
    const latlng = [pos.lat, pos.lon];
    const cutoff = pos.ts - config.trail_minutes * 60000;
    if (same && d.trail.length) { d.trail.pop(); }
    d.trail.push([pos.lat, pos.lon, pos.ts]);
    while (d.trail.length && d.trail[0][2] < cutoff) { d.trail.shift(); }
    if (!map) { return true; }
    if (!d.marker) {
      d.marker = new HeadingMarker(latlng, { radius: 7, weight: 2, heading: pos.heading });
      d.marker.addTo(map);
      d.line = L.polyline([], { weight: 2, opacity: 0.6, interactive: false }).addTo(map);
    }
    d.marker.setLatLng(latlng);
    d.marker.options.heading = pos.heading;
    d.line.setLatLngs(d.trail.map(t => [t[0], t[1]]));
    if (followed === d.id) { map.panTo(latlng); }
    return true;
  }

  function ageText(ms) {
    if (ms === null) { return "never"; }
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    return Math.floor(s / 3600) + " h";
  }

  const ORDER = { live: 0, stale: 1, offline: 2 };

  function render() {
    const now = serverNow();
    const list = document.getElementById("devices");
    const rows = Array.from(state.values()).map(d => [d, stateOf(d, now)]);
    rows.sort((a, b) => (ORDER[a[1]] - ORDER[b[1]]) || a[0].label.localeCompare(b[0].label));
    rows.forEach(([d, st]) => {
      if (!d.li) {
        d.li = document.createElement("li");
        d.li.dataset.device = d.id;
        d.li.innerHTML = '<span class="dot"></span><span class="label"></span><span class="age"></span><span class="details"></span>';
        d.li.addEventListener("click", () => follow(d.id));
      }
      const heard = lastHeard(d), p = d.pos;
      d.li.dataset.state = st;
      d.li.classList.toggle("followed", followed === d.id);
      d.li.querySelector(".label").textContent = d.label;
      d.li.querySelector(".age").textContent = ageText(heard === null ? null : now - heard);
      d.li.querySelector(".details").textContent = p
        ? p.speed + " km/h · " + p.heading + "° · " + p.sats + " sats · " + (p.fix ? "fix" : "no fix")
        : "no position yet";
      if (p) { d.li.dataset.lat = p.lat; d.li.dataset.lon = p.lon; d.li.dataset.ts = p.ts; }
      list.appendChild(d.li);   // appending in order re-sorts the list
      if (d.marker) {
        const color = COLORS[st];
        d.marker.setStyle({ color: color, fillColor: color, fillOpacity: p && p.fix ? 0.9 : 0 });
        d.line.setStyle({ color: color });
      }
    });
  }

  function follow(id) {
    followed = followed === id ? null : id;
    const d = state.get(id);
    if (followed && d && d.pos && map) { map.setView([d.pos.lat, d.pos.lon], Math.max(map.getZoom(), 14)); }
    render();
  }

  function fit() {
    const points = Array.from(state.values()).filter(d => d.pos).map(d => [d.pos.lat, d.pos.lon]);
    if (map && points.length) { map.fitBounds(points, { padding: [40, 40], maxZoom: 15 }); }
  }

  function addViews(views) {
    views.forEach(v => {
      const d = device(v.device, v.label);
      if (v.seen !== null && (d.seen === null || v.seen > d.seen)) { d.seen = v.seen; }
      if (v.position) { place(d, Object.assign({ device: v.device }, v.position)); }
    });
  }

  // -- protocol ----------------------------------------------------------------------------
  function subscribe() {
    const request = eventParam ? { type: "subscribe", id: "page", event: eventParam }
      : { type: "subscribe", id: "page", devices: devicesParam };
    socket.send(JSON.stringify(request));
  }

  function onMessage(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (e) { return; }
    if (msg.now) { learnClock(msg.now); }
    switch (msg.type) {
      case "hello":
        attempt = 0;
        say("Connected to " + msg.instance + " as " + (msg.user || "anonymous"), "");
        subscribe();
        break;
      case "snapshot": {
        const first = !Array.from(state.values()).some(d => d.pos);
        addViews(msg.devices);
        if (first) { fit(); }
        document.getElementById("title").textContent = msg.event ? "Event " + msg.event : "Devices";
        break;
      }
      case "positions":
        msg.positions.forEach(p => { place(device(p.device), p); });
        break;
      case "devices":
        addViews(msg.added);
        msg.removed.forEach(id => {
          const d = state.get(id);
          if (d) {
            if (d.marker) { d.marker.remove(); d.line.remove(); }
            if (d.li) { d.li.remove(); }
            state.delete(id);
          }
        });
        break;
      case "seen":
        msg.devices.forEach(s => { const d = device(s.device); if (d.seen === null || s.seen > d.seen) { d.seen = s.seen; } });
        break;
      case "complete":
        say(msg.reason === "REVOKED" ? "Access to this view was revoked" : "Server shutting down", "error");
        break;
      case "error":
        if (msg.id) { say("Subscription refused: " + msg.error.code, "error"); }
        break;
      default:
        break;   // newer v1 servers may add types: ignore them
    }
    render();
  }

  const CLOSES = {
    4400: ["The page sent something the server did not understand", true],
    4401: ["Not signed in: sign in to Directus on this site, then reload", false],
    4403: ["Not allowed", false],
    4429: ["Too many connections or messages", true],
    4500: ["Server error", true],
    4503: ["Server restarting or authentication unavailable", true],
  };

  function connect() {
    const url = new URL(config.ws, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    say(attempt ? "Reconnecting…" : "Connecting…", "connecting");
    socket = new WebSocket(url.href, SUBPROTOCOL);
    socket.onmessage = e => onMessage(e.data);
    socket.onclose = e => {
      const known = CLOSES[e.code];
      const retry = known ? known[1] : true;
      if (!retry || stopped) { say(known[0], "error"); return; }
      attempt += 1;
      const delay = Math.min(BACKOFF_MAX_MS, 500 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
      say((known ? known[0] : "Connection lost (" + e.code + ")") + "; retrying in " + Math.round(delay / 1000) + " s", "error");
      setTimeout(connect, delay);
    };
  }

  fetch("config.json").then(r => r.json()).then(c => {
    config = c;
    startMap();
    if (!eventParam && !devicesParam.length) {
      say("Add ?event=ID or ?devices=IMEI,IMEI to the address", "error");
      return;
    }
    connect();
    setInterval(render, 1000);
  }).catch(() => say("Could not load the page's configuration", "error"));
})();

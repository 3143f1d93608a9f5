// The TileStream map: footprints coloured by outcome, prediction COGs as map tiles in the
// model card's class colours, popups with each tile's row; /api/tiles is polled, so new tiles
// appear without a reload.
(function () {
  "use strict";
  const settings = window.TILESTREAM;
  // One colour per outcome (data.OUTCOMES): the footprint's outline and its legend swatch.
  const OUTCOME_COLOURS = {answered: "#2166ac", refused: "#b2182b", drifted: "#ff7f00",
                           changed: "#984ea3"};
  // Prediction layers drawn at once: those in view, newest first (1,000 tiles stay responsive).
  const MAX_PREDICTION_LAYERS = 40;

  const map = L.map("map", {worldCopyJump: true}).setView([0, 0], 2);
  if (settings.basemap) {
    L.tileLayer(settings.basemap, {maxZoom: 19, attribution: "basemap"}).addTo(map);
  }
  const footprints = L.featureGroup().addTo(map);
  const shown = new Map();  // tile_id -> {layer, outcome, completed, raster, bounds}
  const predictions = new Map();  // tile_id -> L.TileLayer
  let fitted = false;

  function esc(value) {
    return String(value ?? "").replace(/[&<>"']/g,
      (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  }

  function gsLink(uri) {
    // gs:// objects open through Cloud Storage's authenticated download address.
    return uri && uri.startsWith("gs://")
      ? "https://storage.cloud.google.com/" + uri.slice(5) : "#";
  }

  function popupHtml(p) {
    const rows = [["tile", p.tile_id], ["outcome", p.outcome]];
    if (p.outcome === "refused") {
      rows.push(["stage", p.stage], ["reason", p.reason], ["time", p.time]);
    } else {
      rows.push(["model", p.model_name + " " + p.model_version], ["release", p.release],
                ["acquired", p.acquired], ["completed", p.completed_at],
                ["drifted", String(p.drifted)], ["drift (max band PSI)", p.drift_max_band_psi],
                ["drift (class PSI)", p.drift_class_psi], ["latency (s)", p.latency_s],
                ["chips scored", p.chips_scored]);
    }
    let html = '<div class="popup"><table>' + rows.map(([k, v]) =>
      "<tr><th>" + esc(k) + '</th><td data-field="' + esc(k) + '">' + esc(v) + "</td></tr>")
      .join("");
    if (p.classes && p.classes.length) {
      html += '<tr><th>class areas</th><td data-field="class areas">' + p.classes.map((c) =>
        esc(c.name) + " " + esc(c.area_km2) + " km²").join("<br>") + "</td></tr>";
    }
    if (p.raster_uri) {
      html += '<tr><th>COG</th><td><a class="cog" target="_blank" href="cog/info?url=' +
        encodeURIComponent(p.raster_uri) + '">' + esc(p.raster_uri) + "</a></td></tr>";
    }
    if (p.stac_uri) {
      html += '<tr><th>STAC Item</th><td><a class="stac" target="_blank" href="' +
        esc(gsLink(p.stac_uri)) + '">' + esc(p.stac_uri) + "</a></td></tr>";
    }
    return html + "</table></div>";
  }

  function style(outcome) {
    return {color: OUTCOME_COLOURS[outcome], weight: 2, opacity: 1, fillOpacity: 0.08,
            className: "footprint outcome-" + outcome};
  }

  function predictionUrl(raster) {
    return settings.tile_template + encodeURIComponent(raster);
  }

  function updatePredictions() {
    const view = map.getBounds();
    const wanted = [...shown.entries()]
      .filter(([, t]) => t.raster && t.outcome !== "refused" && view.intersects(t.bounds))
      .sort((a, b) => (b[1].completed || "").localeCompare(a[1].completed || ""))
      .slice(0, MAX_PREDICTION_LAYERS).map(([id]) => id);
    for (const [id, layer] of predictions) {
      if (!wanted.includes(id)) { map.removeLayer(layer); predictions.delete(id); }
    }
    for (const id of wanted) {
      if (predictions.has(id)) continue;
      const t = shown.get(id);
      const layer = L.tileLayer(predictionUrl(t.raster), {bounds: t.bounds, maxZoom: 22,
        className: "prediction", opacity: 0.85});
      layer.addTo(map);
      predictions.set(id, layer);
    }
    footprints.bringToFront();
  }

  function draw(collection) {
    const seen = new Set();
    for (const feature of collection.features) {
      const p = feature.properties;
      seen.add(p.tile_id);
      const known = shown.get(p.tile_id);
      if (known && known.outcome === p.outcome && known.completed === p.completed_at) continue;
      if (known) { footprints.removeLayer(known.layer); }
      const layer = L.geoJSON(feature, {style: () => style(p.outcome)});
      layer.bindPopup(() => popupHtml(p), {maxWidth: 360});
      layer.addTo(footprints);
      layer.eachLayer((path) => { const el = path.getElement(); if (el) el.dataset.tile = p.tile_id; });
      shown.set(p.tile_id, {layer, outcome: p.outcome, completed: p.completed_at,
                            raster: p.raster_uri, bounds: layer.getBounds()});
      if (predictions.has(p.tile_id)) { map.removeLayer(predictions.get(p.tile_id));
                                        predictions.delete(p.tile_id); }
    }
    for (const [id, t] of shown) {
      if (!seen.has(id)) { footprints.removeLayer(t.layer); shown.delete(id); }
    }
    const unplaced = collection.unplaced || [];
    document.getElementById("unplaced-box").hidden = unplaced.length === 0;
    document.getElementById("unplaced").innerHTML = unplaced.map((t) =>
      '<li class="unplaced" data-tile="' + esc(t.tile_id) + '"><span class="swatch" style="background:' +
      OUTCOME_COLOURS[t.outcome] + '"></span>' + esc(t.tile_id) + ": " + esc(t.row.reason) +
      "</li>").join("");
    const c = collection.counts;
    document.getElementById("outcomes").innerHTML = Object.keys(OUTCOME_COLOURS).map((k) =>
      '<li data-outcome="' + k + '"><span class="swatch" style="background:' +
      OUTCOME_COLOURS[k] + '"></span>' + k + " <b>" + (c[k] || 0) + "</b></li>").join("");
    document.getElementById("status").textContent = shown.size + " tiles on the map, last " +
      settings.hours + " h; updated " + new Date().toLocaleTimeString();
    if (!fitted && shown.size) { map.fitBounds(footprints.getBounds(),
      {maxZoom: 12, paddingTopLeft: [20, 20], paddingBottomRight: [290, 20]}); fitted = true; }
    updatePredictions();
  }

  async function poll() {
    try {
      const answer = await fetch("api/tiles", {cache: "no-store"});
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      draw(await answer.json());
    } catch (err) {
      document.getElementById("status").textContent = "cannot read tiles: " + err.message;
    } finally {
      setTimeout(poll, settings.poll_ms);
    }
  }

  fetch("api/legend").then((r) => r.json()).then((legend) => {
    document.getElementById("model").textContent = "(" + legend.model + ")";
    document.getElementById("legend").innerHTML = legend.classes.map((c) =>
      '<li data-class="' + esc(c.name) + '"><span class="swatch" style="background:' +
      esc(c.colour) + '"></span>' + esc(c.name) + "</li>").join("");
  });
  map.on("moveend", updatePredictions);
  poll();
})();

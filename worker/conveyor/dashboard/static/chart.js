// A small line chart in SVG: one polyline per series, a y-axis maximum and a time axis.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 600, height: 180, left: 40, bottom: 16, top: 8 };

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function niceMax(value) {
  if (value <= 4) return 4;
  const step = 10 ** Math.floor(Math.log10(value));
  return Math.ceil(value / step) * step;
}

// series: [{name, colour, values: [number]}], one value per second, the last one now; a series
// shorter than the window (the dashboard started recently) fills only its right-hand end.
function drawChart(svg, series, seconds) {
  svg.replaceChildren();
  const plotW = CHART.width - CHART.left;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const top = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  const y = (v) => CHART.top + plotH - (v / top) * plotH;

  for (const fraction of [0, 0.5, 1]) {
    const at = y(top * fraction);
    svg.append(svgEl("line", { x1: CHART.left, x2: CHART.width, y1: at, y2: at, class: "grid" }));
    const label = svgEl("text", { x: CHART.left - 4, y: at + 4, class: "axis", "text-anchor": "end" });
    label.textContent = String(Math.round(top * fraction));
    svg.append(label);
  }
  const labels = [[`-${Math.round(seconds / 60)} min`, CHART.left, "start"], ["now", CHART.width, "end"]];
  for (const [text, x, anchor] of labels) {
    const label = svgEl("text", { x, y: CHART.height - 2, class: "axis", "text-anchor": anchor });
    label.textContent = text;
    svg.append(label);
  }

  for (const s of series) {
    const values = s.values.slice(-seconds);
    if (values.length < 2) continue;
    const points = values.map((v, i) => {
      const x = CHART.width - ((values.length - 1 - i) / (seconds - 1)) * plotW;
      return `${x.toFixed(1)},${y(v).toFixed(1)}`;
    });
    svg.append(svgEl("polyline", { points: points.join(" "), stroke: s.colour, class: "series" }));
  }
}

function drawLegend(container, series) {
  container.replaceChildren(
    ...series.map((s) => {
      const item = document.createElement("span");
      const swatch = svgEl("svg", { width: 12, height: 12, class: "swatch" });
      swatch.append(svgEl("rect", { width: 12, height: 12, fill: s.colour }));
      item.append(swatch, ` ${s.name}`);
      return item;
    }),
  );
}

// The TaskFly dashboard: a deployments list and one page per deployment, kept live by the
// daemon's event stream (GET /api/v1/events). Plain JS, no build step. The API token lives in
// sessionStorage and travels only as an Authorization header, never in a URL.
'use strict';

const TOKEN_KEY = 'taskfly.token';
const STATES = ['pending', 'provisioning', 'booting', 'registering', 'downloading_assets',
  'running_script', 'completed', 'failed', 'terminating', 'terminated'];
const FINAL = new Set(['completed', 'failed', 'terminated']);
const PAGE_ROWS = 100;
const LOG_POLL_MS = 1000;
const MAX_LOG_LINES = 2000;

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const colors = {};
for (const s of STATES) {
  colors[s] = getComputedStyle(document.documentElement).getPropertyValue('--' + s).trim() || '#999';
}

// ----- API -----

class Unauthorized extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const headers = { Authorization: 'Bearer ' + token(), Accept: 'application/json' };
  const response = await fetch('/api/v1' + path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized('the API token was refused');
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.status + ' ' + response.statusText);
  return body;
}

function loggedOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopStream();
  stopLogs();
  $('login-message').textContent = message || '';
  // Replaced, not assigned: a hashchange would route again and clear the message.
  if (location.hash !== '#/') history.replaceState(null, '', '#/');
  showLogin();
}

function showLogin() {
  current.page = 'login';
  current.deployment = null;
  show('login-page');
  $('logout').hidden = true;
  $('token').focus();
}

function failed(error) {
  if (error instanceof Unauthorized) {
    loggedOut('The daemon refused the API token (401): log in again with a valid one.');
  } else {
    const target = current.page === 'deployment' ? $('dep-message') : $('login-message');
    target.textContent = String(error.message || error);
  }
}

// ----- the event stream: fetch() with a streamed body, since EventSource cannot send headers -----

let stream = null;

function stopStream() {
  if (stream) stream.abort();
  stream = null;
  $('live').textContent = 'offline';
  $('live').classList.remove('on');
}

function startStream(deploymentId, onEvent, onReload) {
  stopStream();
  const controller = new AbortController();
  stream = controller;
  let lastId = null;
  const run = async () => {
    while (!controller.signal.aborted) {
      try {
        const headers = { Authorization: 'Bearer ' + token(), Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const query = deploymentId ? '?deployment=' + encodeURIComponent(deploymentId) : '';
        const response = await fetch('/api/v1/events' + query, { headers, signal: controller.signal });
        if (response.status === 401) throw new Unauthorized('the API token was refused');
        if (!response.ok) throw new Error('event stream: ' + response.status);
        $('live').textContent = 'live';
        $('live').classList.add('on');
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = parseEvent(block);
            if (!event) continue;
            if (event.id) lastId = event.id;
            if (event.type === 'reload') onReload();
            else onEvent(event.type, event.data);
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof Unauthorized) { failed(error); return; }
      }
      if (controller.signal.aborted) return;
      $('live').textContent = 'reconnecting';
      $('live').classList.remove('on');
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  run();
}

function parseEvent(block) {
  let type = null, data = '', id = null;
  for (const line of block.split('\n')) {
    const colon = line.indexOf(':');
    if (colon === 0) continue;
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') type = value;
    else if (field === 'data') data += (data ? '\n' : '') + value;
    else if (field === 'id') id = value;
  }
  if (!type) return null;
  try { return { type, id, data: JSON.parse(data) }; } catch { return null; }
}

// ----- pages -----

const current = { page: null, deployment: null };

function show(page) {
  for (const id of ['login-page', 'list-page', 'deployment-page']) $(id).hidden = id !== page;
}

function route() {
  stopStream();
  stopLogs();
  if (!token()) { showLogin(); return; }
  $('logout').hidden = false;
  const match = location.hash.match(/^#\/d\/([\w-]+)$/);
  if (match) openDeployment(match[1]);
  else openList();
}

function age(from, to) {
  const seconds = Math.max(0, ((to || Date.now()) - from) / 1000);
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + ' s';
  if (seconds < 3600) return Math.floor(seconds / 60) + ' min ' + Math.floor(seconds % 60) + ' s';
  if (seconds < 86400) return Math.floor(seconds / 3600) + ' h ' + Math.floor((seconds % 3600) / 60) + ' min';
  return Math.floor(seconds / 86400) + ' d ' + Math.floor((seconds % 86400) / 3600) + ' h';
}

function duration(d) {
  if (typeof d.duration_s === 'number') return age(0, d.duration_s * 1000);
  const end = d.completed_at ? Date.parse(d.completed_at) : null;
  return age(Date.parse(d.created_at), end);
}

// ----- deployments list -----

const list = new Map();

async function openList() {
  current.page = 'list';
  current.deployment = null;
  show('list-page');
  try {
    const all = await api('/deployments');
    list.clear();
    listRows.clear();
    $('deployments').tBodies[0].replaceChildren();
    for (const d of all) list.set(d.deployment_id, d);
    renderList();
    startStream(null, (type, data) => {
      const known = list.get(data.deployment.deployment_id);
      if (!known || !older(data.deployment.updated_at, known.updated_at)) {
        list.set(data.deployment.deployment_id, data.deployment);
      }
      scheduleRender(renderList);
    }, () => openList());
  } catch (error) {
    failed(error);
  }
}

// Rows are updated in place (a link under the pointer stays the same element), in newest
// first order.
const listRows = new Map();

function renderList() {
  if (current.page !== 'list') return;
  const rows = [...list.values()].sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at));
  $('list-empty').hidden = rows.length > 0;
  const body = $('deployments').tBodies[0];
  rows.forEach((d, i) => {
    let tr = listRows.get(d.deployment_id);
    if (!tr) {
      tr = el('tr');
      const link = el('a', null, d.deployment_id);
      link.href = '#/d/' + d.deployment_id;
      const first = el('td');
      first.append(link);
      tr.append(first, el('td'), el('td'), el('td'), el('td'), el('td'));
      tr.cells[1].append(badge(d.status));
      tr.cells[3].append(progress());
      listRows.set(d.deployment_id, tr);
    }
    const status = tr.cells[1].firstChild;
    status.className = 'badge ' + d.status;
    status.textContent = d.status;
    tr.cells[2].textContent = `${d.nodes_completed} completed` +
      (d.nodes_failed ? `, ${d.nodes_failed} failed` : '') + ` of ${d.total_nodes}` +
      (d.cleaned_at ? ' · cleaned up' : '');
    const [done, bad] = tr.cells[3].firstChild.children;
    done.style.width = (100 * d.nodes_completed / Math.max(1, d.total_nodes)) + '%';
    bad.style.width = (100 * d.nodes_failed / Math.max(1, d.total_nodes)) + '%';
    tr.cells[4].textContent = age(Date.parse(d.created_at));
    tr.cells[5].textContent = duration(d);
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
}

function badge(status) { return el('span', 'badge ' + status, status); }

function progress() {
  const bar = el('div', 'bar');
  bar.append(el('span', 'done'), el('span', 'bad'));
  return bar;
}

let renderQueued = new Set();
function scheduleRender(render) {
  if (renderQueued.has(render)) return;
  renderQueued.add(render);
  requestAnimationFrame(() => { renderQueued.delete(render); render(); });
}

// ----- one deployment -----

const page = { deployment: null, nodes: [], counts: {}, selected: null, offset: 0, filter: '' };

async function openDeployment(id) {
  current.page = 'deployment';
  current.deployment = id;
  show('deployment-page');
  $('dep-message').textContent = '';
  $('logs').replaceChildren();
  logState.after = 0;
  logState.node = $('log-node').value;
  try {
    // Listen first, then read: a change in between arrives as an event and is applied on top.
    const pending = [];
    let loaded = false;
    startStream(id, (type, data) => {
      if (!loaded) pending.push([type, data]);
      else applyEvent(type, data);
    }, () => openDeployment(id));
    const detail = await api('/deployments/' + encodeURIComponent(id));
    if (current.deployment !== id) return;
    page.deployment = detail;
    page.nodes = detail.nodes;
    page.offset = 0;
    recount();
    loaded = true;
    for (const [type, data] of pending) applyEvent(type, data);
    renderDeployment();
    sizeGrid();
    startLogs();
  } catch (error) {
    failed(error);
  }
}

// Whether RFC 3339 time `a` is before `b`.
function older(a, b) { return Date.parse(a) < Date.parse(b); }

function recount() {
  page.counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const n of page.nodes) page.counts[n.status] += 1;
}

function applyEvent(type, data) {
  const d = page.deployment;
  if (!d || data.deployment.deployment_id !== d.deployment_id) return;
  // Two changes made at once may arrive in either order: an older snapshot never wins.
  if (!older(data.deployment.updated_at, d.updated_at)) {
    Object.assign(d, data.deployment, { nodes: page.nodes });
  }
  if (type === 'node') {
    const node = data.node;
    const old = page.nodes[node.node_index];
    if (old && older(node.last_update, old.last_update)) return;
    if (old) page.counts[old.status] -= 1;
    page.counts[node.status] += 1;
    page.nodes[node.node_index] = node;
    drawCell(node.node_index);
    scheduleRender(renderTable);
  }
  scheduleRender(renderHeader);
}

function renderDeployment() {
  renderHeader();
  renderTable();
}

function renderHeader() {
  const d = page.deployment;
  $('dep-id').textContent = d.deployment_id;
  const status = $('dep-status');
  status.className = 'badge ' + d.status;
  status.textContent = d.status;
  $('terminate').disabled = FINAL.has(d.status) || d.status === 'terminating';
  $('dep-summary').textContent = `${d.total_nodes} nodes on ${d.cloud_provider} · ` +
    `${d.nodes_completed} completed, ${d.nodes_failed} failed · age ${age(Date.parse(d.created_at))}` +
    ` · duration ${duration(d)}` + (d.error_message ? ' · ' + d.error_message : '') +
    (d.cleaned_at ? ` · files cleaned up ${age(Date.parse(d.cleaned_at))} ago` : '');
  $('legend').replaceChildren(...STATES.filter((s) => page.counts[s]).map((s) => {
    const item = el('span');
    const swatch = el('i');
    swatch.style.background = colors[s];
    item.append(swatch, `${s} ${page.counts[s]}`);
    return item;
  }));
  const filter = $('state-filter');
  if (filter.options.length === 1) {
    for (const s of STATES) filter.append(new Option(s, s));
  }
}

// The grid: one cell per node on a canvas, so 10,000 nodes cost one element; a node event
// repaints its cell alone.
const grid = { cell: 12, cols: 1 };

function sizeGrid() {
  const canvas = $('grid');
  const n = page.nodes.length;
  const width = canvas.parentElement.clientWidth - 12;
  grid.cell = n <= 64 ? 28 : n <= 400 ? 18 : n <= 2000 ? 10 : n <= 10000 ? 6 : 4;
  grid.cols = Math.max(1, Math.floor(width / grid.cell));
  const rows = Math.max(1, Math.ceil(n / grid.cols));
  const ratio = window.devicePixelRatio || 1;
  canvas.width = grid.cols * grid.cell * ratio;
  canvas.height = rows * grid.cell * ratio;
  canvas.style.width = grid.cols * grid.cell + 'px';
  canvas.style.height = rows * grid.cell + 'px';
  const context = canvas.getContext('2d');
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  for (let i = 0; i < n; i++) drawCell(i);
}

function drawCell(index) {
  const node = page.nodes[index];
  if (!node) return;
  const context = $('grid').getContext('2d');
  const x = (index % grid.cols) * grid.cell;
  const y = Math.floor(index / grid.cols) * grid.cell;
  const gap = grid.cell >= 10 ? 2 : 1;
  context.clearRect(x, y, grid.cell, grid.cell);
  context.fillStyle = colors[node.status] || '#999';
  context.fillRect(x, y, grid.cell - gap, grid.cell - gap);
  if (page.selected === index) {
    context.strokeStyle = '#1f2328';
    context.lineWidth = 2;
    context.strokeRect(x + 1, y + 1, grid.cell - gap - 2, grid.cell - gap - 2);
  }
}

function cellAt(event) {
  const rect = $('grid').getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) / grid.cell);
  const row = Math.floor((event.clientY - rect.top) / grid.cell);
  const index = row * grid.cols + col;
  return col < grid.cols && index >= 0 && index < page.nodes.length ? index : null;
}

function selectNode(index) {
  const before = page.selected;
  page.selected = index;
  if (before !== null) drawCell(before);
  if (index !== null) drawCell(index);
  $('log-node').value = index === null ? '' : index;
  if (index !== null && !page.filter) page.offset = Math.floor(index / PAGE_ROWS) * PAGE_ROWS;
  restartLogs();
  renderTable();
}

// The table: a page of rows, re-rendered at most once a frame.
function renderTable() {
  if (current.page !== 'deployment' || !page.deployment) return;
  const shown = page.filter ? page.nodes.filter((n) => n.status === page.filter) : page.nodes;
  page.offset = Math.min(page.offset, Math.max(0, Math.floor((shown.length - 1) / PAGE_ROWS) * PAGE_ROWS));
  const rows = shown.slice(page.offset, page.offset + PAGE_ROWS);
  $('page-info').textContent = shown.length
    ? `${page.offset + 1}–${page.offset + rows.length} of ${shown.length}` : 'none';
  $('prev-page').disabled = page.offset === 0;
  $('next-page').disabled = page.offset + PAGE_ROWS >= shown.length;
  $('nodes').tBodies[0].replaceChildren(...rows.map((n) => {
    const tr = el('tr', page.selected === n.node_index ? 'selected' : '');
    tr.dataset.index = n.node_index;
    const r = n.resources || {};
    const cells = [n.node_index, badge(n.status), n.attempt ?? '', n.exit_code ?? '',
      typeof n.duration_s === 'number' ? age(0, n.duration_s * 1000) : '',
      typeof r.cpu_percent === 'number' ? r.cpu_percent.toFixed(0) + ' %' : '',
      typeof r.rss_bytes === 'number' ? bytes(r.rss_bytes) + (r.peak_rss_bytes ? ' (peak ' + bytes(r.peak_rss_bytes) + ')' : '') : '',
      n.error_message || n.queue_reason || ''];
    cells.forEach((cell, i) => {
      const td = el('td', i === cells.length - 1 && n.error_message ? 'error' : null);
      if (cell instanceof Node) td.append(cell); else td.textContent = cell;
      tr.append(td);
    });
    return tr;
  }));
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}

// ----- logs: the logs endpoint, read from where the last page ended, while the page is open -----

const logState = { after: 0, node: '', timer: null, busy: false };

function startLogs() {
  stopLogs();
  logState.timer = setInterval(pollLogs, LOG_POLL_MS);
  pollLogs();
}

function stopLogs() {
  if (logState.timer) clearInterval(logState.timer);
  logState.timer = null;
}

function restartLogs() {
  logState.after = 0;
  logState.node = $('log-node').value;
  $('logs').replaceChildren();
  if (current.page === 'deployment') startLogs();
}

async function pollLogs() {
  const id = current.deployment;
  if (logState.busy || !id) return;
  logState.busy = true;
  try {
    let path = `/deployments/${encodeURIComponent(id)}/logs?after=${logState.after}&limit=1000`;
    if (logState.node !== '') path += '&node=' + encodeURIComponent(logState.node);
    const node = logState.node;
    const pageOfLogs = await api(path);
    if (id !== current.deployment || node !== logState.node) return;
    logState.after = pageOfLogs.next;
    appendLogs(pageOfLogs.logs);
  } catch (error) {
    failed(error);
  } finally {
    logState.busy = false;
  }
}

function appendLogs(lines) {
  if (!lines.length) return;
  const box = $('logs');
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const fragment = document.createDocumentFragment();
  for (const l of lines) {
    const line = el('div', l.stream === 'stderr' ? 'stderr' : null);
    line.append(el('span', 'node', `[${l.node_index}] `), l.line);
    fragment.append(line);
  }
  box.append(fragment);
  while (box.childElementCount > MAX_LOG_LINES) box.firstElementChild.remove();
  if ($('log-follow').checked && atBottom) box.scrollTop = box.scrollHeight;
}

// ----- wiring -----

function wire() {
  $('login-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const value = $('token').value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $('token').value = '';
    try {
      await api('/stats');
      $('login-message').textContent = '';
      if (!location.hash || location.hash === '#') location.hash = '#/';
      route();
    } catch (error) {
      if (error instanceof Unauthorized) loggedOut('That API token was refused (401).');
      else loggedOut('Cannot reach the daemon: ' + error.message);
    }
  });
  $('logout').addEventListener('click', () => loggedOut('Logged out.'));
  $('terminate').addEventListener('click', async () => {
    const d = page.deployment;
    if (!d || !confirm(`Terminate ${d.deployment_id}? Every one of its ${d.total_nodes} nodes is stopped and its instance released.`)) return;
    $('terminate').disabled = true;
    try {
      await api('/deployments/' + encodeURIComponent(d.deployment_id), { method: 'DELETE' });
    } catch (error) {
      failed(error);
      $('terminate').disabled = false;
    }
  });
  const canvas = $('grid');
  canvas.addEventListener('mousemove', (event) => {
    const index = cellAt(event);
    const tip = $('tip');
    if (index === null) { tip.hidden = true; return; }
    const n = page.nodes[index];
    tip.textContent = `node ${index}: ${n.status}` + (n.attempt > 1 ? ` (attempt ${n.attempt})` : '') +
      (n.error_message ? ' — ' + n.error_message : '');
    const box = canvas.parentElement.getBoundingClientRect();
    tip.style.left = (event.clientX - box.left + 12) + 'px';
    tip.style.top = (event.clientY - box.top + 12) + 'px';
    tip.hidden = false;
  });
  canvas.addEventListener('mouseleave', () => { $('tip').hidden = true; });
  canvas.addEventListener('click', (event) => {
    const index = cellAt(event);
    selectNode(index === page.selected ? null : index);
  });
  $('nodes').addEventListener('click', (event) => {
    const row = event.target.closest('tr[data-index]');
    if (row) selectNode(Number(row.dataset.index));
  });
  $('state-filter').addEventListener('change', () => {
    page.filter = $('state-filter').value;
    page.offset = 0;
    renderTable();
  });
  $('prev-page').addEventListener('click', () => { page.offset = Math.max(0, page.offset - PAGE_ROWS); renderTable(); });
  $('next-page').addEventListener('click', () => { page.offset += PAGE_ROWS; renderTable(); });
  $('log-node').addEventListener('change', () => {
    const value = $('log-node').value;
    selectNode(value === '' ? null : Number(value));
  });
  window.addEventListener('hashchange', route);
  window.addEventListener('resize', () => { if (current.page === 'deployment' && page.deployment) sizeGrid(); });
  // Ages and running durations move on by themselves; nothing is fetched for them.
  setInterval(() => {
    if (current.page === 'list') renderList();
    else if (current.page === 'deployment' && page.deployment) renderHeader();
  }, 1000);
  route();
}

wire();

// imba ui: one event stream shared by every tab of the UI (a SharedWorker). Each tab connects
// a port; the worker opens /events once and passes what comes to every port.
"use strict";

const ports = new Set();
let source = null;
let open = false;

function tell(what, data) {
  for (const port of ports) port.postMessage({ what, data });
}

function connect() {
  source = new EventSource("/events");
  source.onopen = () => {
    open = true;
    tell("open");
  };
  source.onerror = () => {
    open = false;
    tell("error");
  };
  source.addEventListener("lagged", () => tell("lagged"));
  source.onmessage = (event) => tell("message", event.data);
}

onconnect = (event) => {
  const port = event.ports[0];
  ports.add(port);
  port.onmessage = (message) => {
    if (message.data === "bye") ports.delete(port);
  };
  port.start();
  if (!source) connect();
  else if (open) port.postMessage({ what: "open" });
};

// imagequeue web client: plain DOM in ES modules, no build step. This module puts the page together.

import { onAuthFailure } from "./api.js";
import { bindCards } from "./actions.js";
import { bindForm, loadModels, switchMode } from "./form.js";
import { bindLightbox } from "./lightbox.js";
import { bindHistory, loadHistory, refreshActive } from "./lists.js";
import { openStream, resetStream, setLive, stopStream } from "./live.js";
import { clearMessage, showMessage } from "./messages.js";
import { removeAllQueues } from "./queues.js";
import { bindTokenPanel, currentToken, loadToken, setTokenPanel, showTokenInfo } from "./token.js";

function authFailed(detail) {
  stopStream();
  setLive("off");
  setTokenPanel(true);
  showMessage("auth", "error", currentToken() ? "Your token was refused: it is invalid or has expired."
    : "A token is needed.", [
    detail ? `Server said: ${detail}` : "",
    "Paste a new token above (./run.sh prints one, or: python -m app.cli token <user>).",
  ].filter(Boolean));
}

// Starts over for the current token: nothing of the previous one's queues stays on the page.
function start() {
  resetStream();
  removeAllQueues();
  showTokenInfo();
  if (!currentToken()) {
    setLive("off");
    setTokenPanel(true);
    showMessage("auth", "info", "Paste a token to start.", ["./run.sh prints one (or open the URL it prints)."]);
    return;
  }
  clearMessage("auth");
  loadModels();
  refreshActive();
  loadHistory(true);
  openStream();
}

onAuthFailure(authFailed);
bindTokenPanel(start);
bindForm();
bindHistory();
bindCards();
bindLightbox();
loadToken();
switchMode();
start();

-- Argo CD health check for sft.dev/v1alpha1 SFTJob.
--
-- Install it under `resource.customizations.health.sft.dev_SFTJob` in the argocd-cm
-- ConfigMap (see argocd-cm-patch.yaml). Argo CD runs it with `obj` set to the live object.
--
--   Failed=True                       -> Degraded     (reason: message)
--   Succeeded=True                    -> Healthy
--   status older than the spec        -> Progressing  (the operator has not seen the edit yet)
--   Suspended=True / runPolicy.suspend -> Suspended
--   anything else                     -> Progressing  (phase, percent, train loss)
--
-- Automation reads conditions, not status.phase (a summary for people), so the terminal
-- decisions come from conditions. Written for Argo CD's Lua 5.1 (gopher-lua).

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function explain(c, fallback)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if reason ~= "" then
    return reason
  end
  if message ~= "" then
    return message
  end
  return fallback
end

local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the SFTJob"
  return hs
end

local failed = condition(status, "Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = explain(failed, "The SFTJob failed")
  return hs
end

local succeeded = condition(status, "Succeeded")
if is_true(succeeded) then
  hs.status = "Healthy"
  local message = explain(succeeded, "Training finished")
  if status.output ~= nil and status.output.model ~= nil then
    message = message .. "; model at " .. status.output.model
  end
  hs.message = message
  return hs
end

if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local suspended = condition(status, "Suspended")
local suspend_requested = obj.spec ~= nil and obj.spec.runPolicy ~= nil and obj.spec.runPolicy.suspend == true
if is_true(suspended) or (suspend_requested and status.phase == "Suspended") then
  hs.status = "Suspended"
  hs.message = explain(suspended or {}, "Suspended by spec.runPolicy.suspend")
  return hs
end

local parts = {}
table.insert(parts, status.phase or "Pending")
if status.progress ~= nil and status.progress.percent ~= nil then
  table.insert(parts, tostring(status.progress.percent) .. "%")
end
if status.metrics ~= nil and status.metrics.trainLoss ~= nil then
  table.insert(parts, "loss " .. string.format("%.4g", status.metrics.trainLoss))
end
local waiting = condition(status, "Running")
if waiting ~= nil and waiting.status ~= "True" and waiting.reason ~= nil and waiting.reason ~= "" then
  table.insert(parts, "(" .. explain(waiting, "") .. ")")
end
hs.status = "Progressing"
hs.message = table.concat(parts, " ")
return hs

package demo;

import demo.common.Report;
import java.util.concurrent.CountDownLatch;
import org.apache.dubbo.common.URL;
import org.apache.dubbo.config.ApplicationConfig;
import org.apache.dubbo.config.ReferenceConfig;
import org.apache.dubbo.config.ServiceConfig;
import org.apache.dubbo.config.bootstrap.DubboBootstrap;
import org.apache.dubbo.rpc.RpcContext;

/**
 * A Dubbo 3.3 Greeter provider or consumer, configured the way a Dubbo team configures one:
 * by ordinary Dubbo properties. The registry ({@code dubbo.registry.address=zookeeper://...}
 * or {@code nacos://...}), the protocol ({@code dubbo.protocol.name=tri}, default dubbo), the
 * port and the tag are never in the code.
 *
 * <pre>
 * java -Ddubbo.registry.address=nacos://10.0.0.15:8848 -Ddubbo.protocol.name=tri \
 *      -Ddemo.id=cloud-1 -jar dubbo33.jar provider
 * java -Ddubbo.registry.address=nacos://10.0.0.15:8848 [-Ddubbo.consumer.tag=NAME] \
 *      -jar dubbo33.jar consumer [CALLS] [TAG]
 * </pre>
 *
 * The provider prints "ready ..." once registered; the consumer makes CALLS calls (10 by
 * default), each with the {@code dubbo.tag} attachment set to TAG when given, and prints one
 * line per call and a summary (demo.common.Report).
 */
public final class Main {
    private Main() {}

    public static void main(String[] args) throws Exception {
        String role = args.length > 0 ? args[0] : "";
        if (role.equals("provider")) {
            provider();
        } else if (role.equals("consumer")) {
            consumer(Report.intArg(args, 1, 10), args.length > 2 ? args[2] : null);
        } else {
            System.err.println("usage: dubbo33.jar provider | consumer [CALLS] [TAG]");
            System.exit(2);
        }
    }

    /** The provider's id in replies: {@code -Ddemo.id=...}. */
    private static String id() {
        return System.getProperty("demo.id", "provider");
    }

    static void provider() throws InterruptedException {
        ServiceConfig<Greeter> service = new ServiceConfig<>();
        service.setInterface(Greeter.class);
        service.setRef(name -> Report.reply(id(), RpcContext.getServiceContext().getRemoteHost(), name));
        DubboBootstrap.getInstance()
                .application(new ApplicationConfig("greeter-provider"))
                .service(service)
                .start();
        for (URL url : service.getExportedUrls()) {
            String tag = url.getParameter("dubbo.tag");
            Report.ready(id(), url.getAddress(), "url=" + url.getProtocol() + "://" + url.getAddress() + "/" + url.getPath()
                    + (tag == null ? "" : " tag=" + tag));
        }
        // Serves until stopped; Dubbo's shutdown hook unregisters on SIGTERM.
        new CountDownLatch(1).await();
    }

    static void consumer(int calls, String tag) {
        ReferenceConfig<Greeter> reference = new ReferenceConfig<>();
        reference.setInterface(Greeter.class);
        // Start even with no provider yet: every call then fails and is counted.
        reference.setCheck(false);
        DubboBootstrap.getInstance()
                .application(new ApplicationConfig("greeter-consumer"))
                .reference(reference)
                .start();
        Greeter greeter = reference.get();
        Report.calls(calls, i -> {
            if (tag != null) {
                // Per-call tag routing: the attachment lasts one invocation.
                RpcContext.getClientAttachment().setAttachment("dubbo.tag", tag);
            }
            return greeter.hello("call-" + i);
        });
        System.exit(0);
    }
}
